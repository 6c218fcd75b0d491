"""Fast unit tests of serving pieces: referral rule, audit log across processes, error shapes."""
from __future__ import annotations

import base64
import io
import json
import multiprocessing as mp

import numpy as np
import pytest
from PIL import Image

from serve.audit import AuditLog
from serve.errors import http_exception_response
from serve.referral import Referral

NAMES = ["normal", "pneumonia", "tuberculosis"]


def test_low_confidence():
    rule = Referral(NAMES, 0.6)
    assert rule.decide(np.array([0.5, 0.3, 0.2])) == ("normal", 0.5, True, "low_confidence: 0.500 < 0.6")
    label, confidence, needs_review, reason = rule.decide(np.array([0.1, 0.8, 0.1]))
    assert (label, needs_review, reason) == ("pneumonia", False, None) and confidence == pytest.approx(0.8)


def test_threshold_disagreement():
    rule = Referral(NAMES, 0.6, {"pneumonia": 0.3, "tuberculosis": 0.9})
    # argmax normal, but pneumonia reaches its threshold
    _, _, review, reason = rule.decide(np.array([0.65, 0.32, 0.03]))
    assert review and "threshold_disagreement" in reason and "pneumonia" in reason
    # argmax tuberculosis below its own threshold
    _, _, review, reason = rule.decide(np.array([0.1, 0.1, 0.8]))
    assert review and "tuberculosis 0.800 < threshold 0.9" in reason
    # agreement: argmax pneumonia above its threshold, nobody else above theirs
    assert rule.decide(np.array([0.2, 0.75, 0.05]))[2:] == (False, None)
    # both reasons at once
    _, _, review, reason = rule.decide(np.array([0.45, 0.4, 0.15]))
    assert review and reason.startswith("low_confidence") and "threshold_disagreement" in reason


def test_an_image_farther_from_the_training_images_than_the_threshold_is_referred():
    rule = Referral(NAMES, 0.6, feature_distance={"threshold": 10.0, "pass_rate": 0.99, "split": "val"})
    confident = np.array([0.05, 0.9, 0.05])
    assert rule.decide(confident, 9.5)[2:] == (False, None)
    assert rule.decide(confident, 10.5)[2:] == (True, "unlike_training_data: feature distance 10.5 > 10")
    assert rule.decide(confident, None)[2] is False  # a model without a distance refers on confidence alone


def test_thresholds_from_spec_and_validation():
    spec = {"class_names": NAMES, "thresholds": {"tuberculosis": "0.4"}}
    assert Referral.from_spec(spec, 0.6).thresholds == {"tuberculosis": 0.4}
    assert Referral.from_spec({"class_names": NAMES}, 0.6).thresholds == {}
    with pytest.raises(ValueError):
        Referral(NAMES, 0.6, {"fracture": 0.5})


def _write_many(path: str, worker: int, n: int) -> None:
    log = AuditLog(path)
    for i in range(n):  # lines far over PIPE_BUF (4096): only the lock keeps them whole
        log.write({"worker": worker, "i": i, "padding": "x" * 6000})


def test_audit_log_whole_lines_across_processes(tmp_path):
    path = tmp_path / "audit" / "log.jsonl"
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_write_many, args=(str(path), w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == 600
    records = [json.loads(line) for line in lines]
    assert {(r["worker"], r["i"]) for r in records} == {(w, i) for w in range(4) for i in range(150)}
    assert all("time" in r for r in records)


def test_audit_log_disabled_and_picklable(tmp_path):
    AuditLog(None).write({"a": 1})  # no-op
    import pickle
    log = AuditLog(tmp_path / "a.jsonl")
    log.write({"a": 1})
    clone = pickle.loads(pickle.dumps(log))
    clone.write({"a": 2})
    assert [json.loads(x)["a"] for x in (tmp_path / "a.jsonl").read_text().splitlines()] == [1, 2]


def test_audit_log_follows_log_rotation(tmp_path):
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    log.write({"a": 1})
    path.rename(tmp_path / "audit.jsonl.1")  # logrotate's rename
    log.write({"a": 2})
    assert [json.loads(x)["a"] for x in (tmp_path / "audit.jsonl.1").read_text().splitlines()] == [1]
    assert [json.loads(x)["a"] for x in path.read_text().splitlines()] == [2]
    path.unlink()  # removed while the server runs: the next line starts a new file, not a deleted one
    log.write({"a": 3})
    assert [json.loads(x)["a"] for x in path.read_text().splitlines()] == [3]


def test_explain_audits_the_backend_that_answered(tiny_checkpoint, tmp_path, monkeypatch):
    from serve.api import ExplainAPI, Settings

    audit = tmp_path / "audit.jsonl"
    api = ExplainAPI(Settings(ckpt_path=str(tiny_checkpoint), backend="onnx", audit_log=str(audit)))
    api.setup("cpu")
    image = io.BytesIO()
    Image.fromarray(np.arange(64 * 64, dtype=np.uint8).reshape(64, 64)).save(image, "PNG")
    request = {"image": base64.b64encode(image.getvalue()).decode()}
    api.encode_response(api.predict(api.decode_request(request)))
    assert json.loads(audit.read_text())["backend"] == "torch"  # Grad-CAM needs the PyTorch model


def test_error_shape():
    response = http_exception_response(404, "Not Found")
    assert response.status_code == 404
    assert json.loads(response.body) == {"error": {"code": "not_found", "message": "Not Found"}}
    response = http_exception_response(422, {"code": "invalid_image", "message": "broken"})
    assert json.loads(response.body) == {"error": {"code": "invalid_image", "message": "broken"}}


def test_read_spec_rejects_non_cxr_checkpoints(tmp_path, tiny_checkpoint):
    import torch
    from cxr.checkpoint import read_spec
    assert read_spec(tiny_checkpoint)["backbone"] == "test_efficientnet"
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError):
        read_spec(tmp_path / "other.ckpt")
    with pytest.raises(FileNotFoundError):
        read_spec(tmp_path / "missing.ckpt")


@pytest.mark.parametrize("overrides, expected", [
    ([], {"/predict": 1, "/predict/batch": 1, "/predict/explain": 1}),
    (["server.predict_workers=2"], {"/predict": 2, "/predict/batch": 1, "/predict/explain": 1}),
    (["server.workers_per_device=2"], {"/predict": 2, "/predict/batch": 2, "/predict/explain": 2}),
])
def test_predict_workers_only_scale_predict(tiny_checkpoint, tmp_path, overrides, expected):
    from hydra import compose, initialize_config_dir

    from cxr.config import CONFIG_DIR
    from serve.app import build_server

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt_path={tiny_checkpoint}", f"paths.cache_dir={tmp_path}", *overrides])
    assert build_server(cfg)._workers_per_device_by_api_path == expected


def test_unwritable_audit_log_stops_the_server_at_build(tiny_checkpoint, tmp_path):
    from hydra import compose, initialize_config_dir

    from cxr.config import CONFIG_DIR
    from serve.app import build_server

    (tmp_path / "a_file").write_text("")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("serve", overrides=[f"ckpt_path={tiny_checkpoint}", f"paths.cache_dir={tmp_path}",
                                          f"server.audit_log={tmp_path / 'a_file' / 'audit.jsonl'}"])
    with pytest.raises(ValueError, match="server.audit_log"):
        build_server(cfg)


def test_model_info_keeps_training_image_fingerprints_private(tiny_checkpoint):
    from types import SimpleNamespace

    from cxr.checkpoint import read_spec
    from serve.api import Settings
    from serve.app import model_info

    spec = read_spec(tiny_checkpoint)
    spec["data_summary"] = {**spec["data_summary"], "train_image_sha256": ["0123456789abcdef"]}
    info = model_info(spec, Settings(ckpt_path=str(tiny_checkpoint)), SimpleNamespace(max_payload_bytes=1000, max_in_flight=32))
    assert info["training_data"] == {k: v for k, v in spec["data_summary"].items() if k != "train_image_sha256"}
    assert "0123456789abcdef" not in json.dumps(info)


def test_an_image_the_model_fails_on_fails_alone_in_a_dynamic_batch():
    from serve.api import Job, PredictAPI, Settings
    from serve.requests import DecodedImage

    class PickyBackend:  # stands in for a model that raises on one odd input
        def predict_scored(self, images):
            if any(image.shape == (3, 3) for image in images):
                raise RuntimeError("cannot take a 3x3 image")
            return np.full((len(images), 3), 1 / 3), np.full(len(images), 7.0)

    api = PredictAPI(Settings(ckpt_path="unused.ckpt"))
    api.backend = PickyBackend()
    jobs = [Job(request_id=str(i), started=0.0, image=DecodedImage(np.zeros(shape, np.uint8), ""))
            for i, shape in enumerate([(8, 8), (3, 3), (8, 8)])]
    outputs = api.predict(jobs)
    assert [job.error is None for job, _ in outputs] == [True, False, True]
    assert outputs[1][0].error.status_code == 500 and outputs[1][1] is None
    for _, (probabilities, distance) in (outputs[0], outputs[2]):
        np.testing.assert_allclose(probabilities, 1 / 3)
        assert distance == 7.0
    assert api.encode_response(outputs[1]).status_code == 500


def test_a_request_that_fails_to_decode_unexpectedly_fails_alone():
    """Anything decode_request did not foresee becomes this request's 500, not an exception that would fail
    every request of the dynamic batch it joins."""
    from serve.api import PredictAPI, Settings

    def decoder_bug(request):
        raise RuntimeError("a decoder bug")

    api = PredictAPI(Settings(ckpt_path="unused.ckpt"))
    api._decode_one = decoder_bug
    job = api.decode_request({"image": "unused"})
    assert job.error is not None and job.error.status_code == 500
    assert api.encode_response((job, None)).status_code == 500


def test_a_request_no_worker_answers_gets_504_at_the_deadline_and_frees_its_place():
    """LitServe waits for a worker's answer without end: requests held by a worker that died kept their places, and
    after max_in_flight of them every request was answered 503 until a restart."""
    import asyncio

    from serve.middleware import RequestGuard

    async def scenario():
        async def dead_worker(scope, receive, send):
            await asyncio.Event().wait()  # never answers

        guard = RequestGuard(dead_worker, paths=["/predict"], max_bytes=1000, max_in_flight=1, deadline=0.2)
        for _ in range(2):  # the second is admitted: the first freed its place
            sent = []

            async def receive():
                return {"type": "http.request", "body": b'{"image": "x"}', "more_body": False}

            async def send(message):
                sent.append(message)

            await guard({"type": "http", "method": "POST", "path": "/predict",
                         "headers": [(b"content-type", b"application/json")]}, receive, send)
            body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
            assert sent[0]["status"] == 504 and body["error"]["code"] == "timeout" and "server.deadline" in \
                body["error"]["message"]
            assert guard.in_flight == 0

    asyncio.run(scenario())


def test_the_guard_answers_503_beyond_max_in_flight_and_admits_again_once_one_ends():
    import asyncio

    from serve.middleware import RequestGuard

    async def scenario():
        release = asyncio.Event()

        async def model_app(scope, receive, send):  # stands for LitServe: holds the request until released
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = RequestGuard(model_app, paths=["/predict"], max_bytes=1000, max_in_flight=1)

        async def request() -> tuple[int, dict, bytes]:
            scope = {"type": "http", "method": "POST", "path": "/predict",
                     "headers": [(b"content-type", b"application/json")]}
            sent = []

            async def receive():
                return {"type": "http.request", "body": b'{"image": "x"}', "more_body": False}

            async def send(message):
                sent.append(message)

            await guard(scope, receive, send)
            headers = {k.decode(): v.decode() for k, v in sent[0].get("headers", [])}
            return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

        first = asyncio.create_task(request())
        await asyncio.sleep(0.05)
        status, headers, body = await request()
        assert (status, headers["retry-after"]) == (503, "1") and json.loads(body)["error"]["code"] == "overloaded"
        release.set()
        assert (await first)[0] == 200
        assert (await request())[0] == 200  # the finished request freed its place
        assert guard.in_flight == 0

    asyncio.run(scenario())


def test_an_upload_that_stalls_is_answered_408_at_the_deadline_and_frees_its_place():
    """A client that sends part of its body and then nothing held its max_in_flight place for as long as it kept
    the connection open: 32 of them shut the server to everyone."""
    import asyncio

    from serve.middleware import RequestGuard

    async def scenario():
        async def model_app(scope, receive, send):
            raise AssertionError("a request whose body never arrived reached the model")

        guard = RequestGuard(model_app, paths=["/predict"], max_bytes=100_000, max_in_flight=1, deadline=0.2)
        parts = iter([{"type": "http.request", "body": b"--xyz\r\n", "more_body": True}])

        async def stalling_receive():
            return next(parts, None) or await asyncio.Event().wait()

        sent = []

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/predict",
                 "headers": [(b"content-type", b"multipart/form-data; boundary=xyz"), (b"content-length", b"100000")]}
        await asyncio.wait_for(guard(scope, stalling_receive, send), 10)  # it waited for as long as the client did
        headers = dict(sent[0]["headers"])
        body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
        assert (sent[0]["status"], body["error"]["code"], headers[b"connection"]) == (408, "request_timeout", b"close")
        assert guard.in_flight == 0

    asyncio.run(scenario())


def test_a_request_frees_its_place_as_its_answer_goes_out():
    """A keep-alive client's next request may arrive before the guard's own call returns: its answered request
    must no longer count (one client per place got spurious 503s)."""
    import asyncio

    from serve.middleware import RequestGuard

    async def scenario():
        async def model_app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        guard = RequestGuard(model_app, paths=["/predict"], max_bytes=1000, max_in_flight=1)
        counted_when_sent = []

        async def receive():
            return {"type": "http.request", "body": b'{"image": "x"}', "more_body": False}

        async def send(message):
            if message["type"] == "http.response.body":
                counted_when_sent.append(guard.in_flight)

        await guard({"type": "http", "method": "POST", "path": "/predict",
                     "headers": [(b"content-type", b"application/json")]}, receive, send)
        assert counted_when_sent == [0] and guard.in_flight == 0

    asyncio.run(scenario())


def test_health_waits_on_a_pending_probe_and_replaces_it_once_past_the_deadline(monkeypatch):
    """A /health call while the last probe is still out must wait on it (it was a 500: the probe's start time was
    read before the handler had bound it), and once it is 3 health timeouts old a new probe replaces it (waiting for
    server.deadline, 120 s, kept /health failing for two minutes after a worker restart that lost the probe)."""
    import asyncio
    import time

    import litserve as ls
    from fastapi import FastAPI
    from fastapi.testclient import TestClient
    from starlette.responses import Response

    import serve.app as app_module

    class FirstProbeLost:
        calls = 0

        def __init__(self, api, server):
            pass

        async def handle_request(self, request, request_type):
            FirstProbeLost.calls += 1
            if FirstProbeLost.calls == 1:  # held by a worker that died: never answered
                await asyncio.Event().wait()
            return Response(status_code=200)

    class Server:
        healthcheck_path, info_path = "/health", "/info"
        workers_setup_status = {"predict": ls.server.WorkerSetupStatus.READY}
        app = FastAPI()

    class Predict:
        def authorize(self) -> None:
            return None

    monkeypatch.setattr(app_module, "RegularRequestHandler", FirstProbeLost)
    app_module.install_routes(Server(), Predict(), {}, health_timeout=0.5, deadline=60.0)
    with TestClient(Server.app) as client:
        for _ in range(2):  # the first sends the probe; the second finds it out and waits on it
            answer = client.get("/health")
            assert (answer.status_code, answer.json()["error"]["code"]) == (503, "not_answering"), answer.text
        assert FirstProbeLost.calls == 1
        time.sleep(1.5)  # 3 health timeouts after it was sent: the probe is lost and a new one is sent
        answer = client.get("/health")
        assert answer.status_code == 200 and FirstProbeLost.calls == 2, answer.text


def test_a_data_url_is_read_whatever_the_case_of_its_scheme():
    from serve.requests import _b64

    payload = base64.b64encode(b"\x89PNG").decode()
    for prefix in ("", "data:image/png;base64,", "DATA:image/png;base64,", "Data:image/png;base64,"):
        assert _b64(prefix + payload, "image") == b"\x89PNG"
