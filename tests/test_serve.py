"""The real server (`cxr-serve` subprocess, one per module): every endpoint, both encodings, formats,
DICOM, bad input, auth, CORS, batch limits, and the audit log under concurrent load."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import re
import signal
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from conftest import CLASS_NAMES, TINY_PREPROCESSING, add_feature_distance, make_tiny_checkpoint
from cxr.calibration import Calibration
from cxr.data.decode import decode_image, to_uint8
from cxr.inference import file_sha256, load_classifier
from cxr.checkpoint import CHECKPOINT_KEY, read_spec
from cxr.models.feature_distance import SPEC_KEY as FEATURE_DISTANCE
from serve.testing import start_server
from test_dicom import gradient16, labelled_htj2k, make_dicom

API_KEY = "test-key-123"
AUTH = {"X-API-Key": API_KEY}
THRESHOLDS = {"normal": 0.99, "pneumonia": 0.99, "tuberculosis": 0.99}  # never reached: always a disagreement
MAX_PAYLOAD = 3_000_000
ORIGIN = "http://viewer.example"


# ---------------------------------------------------------------- test images, built at test time
def xray_like(seed: int = 0, size: tuple[int, int] = (96, 80)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[0], 0:size[1]]
    base = 120 + 60 * np.sin(x / (7 + seed)) * np.cos(y / 9) + rng.normal(0, 20, size)
    return base.clip(0, 255).astype(np.uint8)


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def png(seed: int = 0) -> bytes:
    return encode(Image.fromarray(xray_like(seed)))


def variants() -> dict[str, bytes]:
    gray = xray_like(3)
    rgb = np.repeat(gray[..., None], 3, axis=-1)
    rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 255, np.uint8)], axis=-1)
    return {
        "png8_grey": encode(Image.fromarray(gray)),
        "png16_grey": encode(Image.fromarray(gradient16().astype(np.int32), mode="I").convert("I;16")),
        "png_rgb": encode(Image.fromarray(rgb)),
        "png_rgba": encode(Image.fromarray(rgba, mode="RGBA")),
        "png_palette": encode(Image.fromarray(rgb).convert("P")),
        "jpeg": encode(Image.fromarray(gray), "JPEG"),
        "dicom_mono2_16bit": make_dicom(gradient16()),
        "dicom_mono1_16bit": make_dicom(gradient16(), "MONOCHROME1"),
    }


def png_bomb(width: int = 60_000, height: int = 60_000) -> bytes:
    """A valid-looking PNG whose header declares width x height pixels but whose body is tiny."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(b"\0" * 1000))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + idat + chunk(b"IEND", b"")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("serve_ckpt") / "tiny.ckpt",
                                calibration=Calibration(0.05, (0.0, 0.2, 0.1)))
    checkpoint = torch.load(path, weights_only=False)
    checkpoint[CHECKPOINT_KEY]["thresholds"] = THRESHOLDS
    torch.save(checkpoint, path)
    # "Training" images: the x-ray-like test images of seeds 0-11, each within the threshold; noise lies beyond it.
    return add_feature_distance(path, [xray_like(seed) for seed in range(12)])


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    audit = tmp / "audit.jsonl"
    # Two /predict workers: the audit log then has three writer processes (two predict, one batch).
    proc = start_server(ckpt, tmp, f"server.api_key={API_KEY}", f"server.audit_log={audit}",
                        "server.review_confidence=0.5", f"server.max_payload_bytes={MAX_PAYLOAD}",
                        f"server.cors_origins=['{ORIGIN}']", "server.max_batch_size=8", "server.batch_timeout=0.05",
                        "server.num_api_servers=1", "server.predict_workers=2")
    with proc:
        proc.audit_path = audit
        yield proc


@pytest.fixture(scope="module")
def reference(ckpt):
    classifier = load_classifier(ckpt)
    return lambda data: classifier.predict([decode_image(data)])[0]


@pytest.fixture(scope="module")
def reference_distance(ckpt):
    classifier = load_classifier(ckpt)
    return lambda data: float(classifier.predict_scored([decode_image(data)])[1][0])


def post(server, path, headers=AUTH, **kwargs) -> requests.Response:
    return requests.post(server.url + path, headers=headers, timeout=60, **kwargs)


def check_result(result: dict, ckpt) -> None:
    assert set(result) >= {"label", "probabilities", "confidence", "needs_review", "review_reason", "model_sha256",
                           "request_id", "latency_ms"}
    probs = result["probabilities"]
    assert list(probs) == CLASS_NAMES
    assert abs(sum(probs.values()) - 1.0) < 1e-4
    assert result["label"] == max(probs, key=probs.get)
    assert result["confidence"] == pytest.approx(max(probs.values()))
    assert result["model_sha256"] == file_sha256(ckpt)
    assert len(result["request_id"]) >= 16 and result["latency_ms"] > 0
    # Thresholds of 0.99 are never reached, so the threshold decision always disagrees with the argmax.
    assert result["needs_review"] is True and "threshold_disagreement" in result["review_reason"]
    beyond = result["feature_distance"] > read_spec(ckpt)[FEATURE_DISTANCE]["threshold"]
    assert ("unlike_training_data" in result["review_reason"]) == beyond


# ---------------------------------------------------------------- health and info
def test_health_is_open_and_answers(server):
    response = requests.get(server.url + "/health", timeout=30)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_model_info(server, ckpt):
    assert requests.get(server.url + "/model/info", timeout=10).status_code == 401
    assert requests.get(server.url + "/model/info", headers={"X-API-Key": "wrong"}, timeout=10).status_code == 401
    info = requests.get(server.url + "/model/info", headers=AUTH, timeout=10).json()
    assert info["architecture"] == "test_efficientnet" and info["ensemble_size"] == 1
    assert info["class_names"] == CLASS_NAMES
    assert info["input"]["size"] == [3, 64, 64]
    assert info["input"]["normalization"]["mean"] == [0.5, 0.5, 0.5]
    assert info["input"]["steps"][-2:] == ["resize to 64 x 64 by area averaging (OpenCV INTER_AREA)",
                                           TINY_PREPROCESSING.steps()[-1]]
    assert info["temperature"] == pytest.approx(0.05)
    assert info["logit_bias"] == pytest.approx({"normal": 0.0, "pneumonia": 0.2, "tuberculosis": 0.1})
    assert info["thresholds"] == THRESHOLDS and info["review_confidence"] == 0.5
    assert "confidence < 0.5" in info["referral_rule"] and "unlike_training_data" in info["referral_rule"]
    assert info["feature_distance"] == read_spec(ckpt)[FEATURE_DISTANCE]
    assert info["checkpoint_sha256"] == file_sha256(ckpt)
    assert info["training_data"] == {"counts": {"train": {"synthetic": {"normal": 1}}}}
    assert info["package_version"] and info["limits"]["max_images_per_request"] == 10
    assert info["limits"]["max_in_flight_per_api_server"] == 32
    # LitServe's own /info (no auth) is not exposed.
    assert requests.get(server.url + "/info", timeout=10).status_code == 404


# ---------------------------------------------------------------- /predict
def test_predict_multipart_and_json_agree_with_offline_model(server, ckpt, reference):
    data = png(1)
    multipart = post(server, "/predict", files={"file": ("x.png", data, "image/png")})
    as_json = post(server, "/predict", json={"image": b64(data)})
    assert multipart.status_code == 200 and as_json.status_code == 200
    a, b = multipart.json(), as_json.json()
    check_result(a, ckpt)
    check_result(b, ckpt)
    assert a["request_id"] != b["request_id"]
    expected = reference(data)
    np.testing.assert_allclose([a["probabilities"][c] for c in CLASS_NAMES], expected, atol=1e-5)
    np.testing.assert_allclose([b["probabilities"][c] for c in CLASS_NAMES], expected, atol=1e-5)


@pytest.mark.parametrize("name", list(variants()))
def test_predict_formats(server, ckpt, reference, name):
    data = variants()[name]
    response = post(server, "/predict", files={"file": ("upload", data, "application/octet-stream")})
    assert response.status_code == 200, response.text
    check_result(response.json(), ckpt)
    got = [response.json()["probabilities"][c] for c in CLASS_NAMES]
    np.testing.assert_allclose(got, reference(data), atol=1e-5)


def test_uploads_over_one_mib_are_served(server, ckpt, reference):
    """Real X-rays are megabytes. Starlette spools an upload over 1 MiB to a file on disk, which cannot be pickled to
    a worker; LitServe 0.2.19 lifts that spool limit for this reason (every other test sends a few kB)."""
    noise = np.random.default_rng(0).integers(0, 256, (1100, 1100), dtype=np.uint8)  # PNG cannot compress it
    data = encode(Image.fromarray(noise))
    assert 1 << 20 < len(data) < MAX_PAYLOAD - 10_000
    single = post(server, "/predict", files={"file": ("big.png", data, "image/png")})
    assert single.status_code == 200, single.text
    check_result(single.json(), ckpt)
    np.testing.assert_allclose([single.json()["probabilities"][c] for c in CLASS_NAMES], reference(data), atol=1e-5)
    batch = post(server, "/predict/batch", files=[("files", ("big.png", data, "image/png")),
                                                  ("files", ("small.png", png(1), "image/png"))])
    assert batch.status_code == 200, batch.text
    for result, sent in zip(batch.json()["results"], (data, png(1)), strict=True):
        np.testing.assert_allclose([result["probabilities"][c] for c in CLASS_NAMES], reference(sent), atol=1e-5)


def test_mixed_case_media_type_and_wrapped_base64_are_accepted(server, reference):
    """Media types are case-insensitive, and line-wrapped base64 (the `base64` CLI, MIME) is still base64."""
    data = png(3)
    form = requests.Request("POST", server.url, files={"file": ("x.png", data, "image/png")}).prepare()
    content_type = form.headers["Content-Type"].replace("multipart/form-data", "Multipart/Form-Data")
    mixed_case = post(server, "/predict", data=form.body, headers={**AUTH, "Content-Type": content_type})
    wrapped = post(server, "/predict", json={"image": base64.encodebytes(data).decode()})
    for response in (mixed_case, wrapped):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose([response.json()["probabilities"][c] for c in CLASS_NAMES], reference(data),
                                   atol=1e-5)


def test_dicom_monochrome1_served_as_inverted_image(server):
    pixels = gradient16()
    inverted_png = encode(Image.fromarray(255 - to_uint8(pixels)))
    dicom = post(server, "/predict", json={"image": b64(make_dicom(pixels, "MONOCHROME1"))}).json()
    as_png = post(server, "/predict", json={"image": b64(inverted_png)}).json()
    plain = post(server, "/predict", json={"image": b64(make_dicom(pixels, "MONOCHROME2"))}).json()
    assert dicom["probabilities"] == pytest.approx(as_png["probabilities"], abs=1e-6)
    assert dicom["probabilities"] != pytest.approx(plain["probabilities"], abs=1e-6)


# ---------------------------------------------------------------- /predict/batch
def test_batch_multipart_and_json_in_order(server, ckpt, reference):
    images = [png(seed) for seed in (4, 5, 6)]
    files = [("files", (f"{i}.png", d, "image/png")) for i, d in enumerate(images)]
    multipart = post(server, "/predict/batch", files=files)
    as_json = post(server, "/predict/batch", json={"images": [b64(d) for d in images]})
    for response in (multipart, as_json):
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        assert len(results) == 3
        for result, data in zip(results, images):
            check_result(result, ckpt)
            np.testing.assert_allclose([result["probabilities"][c] for c in CLASS_NAMES], reference(data), atol=1e-5)


def test_an_image_unlike_the_training_data_needs_review_on_every_endpoint(server, ckpt, reference_distance):
    like = png(1)  # one of the images the distance was fitted on
    unlike = encode(Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 80), dtype=np.uint8)))
    threshold = read_spec(ckpt)[FEATURE_DISTANCE]["threshold"]
    assert reference_distance(like) <= threshold < reference_distance(unlike)
    single = post(server, "/predict", files={"file": ("x.png", unlike, "image/png")}).json()
    explained = post(server, "/predict/explain", json={"image": b64(unlike)}).json()
    batch = post(server, "/predict/batch", json={"images": [b64(like), b64(unlike)]}).json()["results"]
    for result in (single, explained, batch[1]):
        assert result["feature_distance"] == pytest.approx(reference_distance(unlike), rel=1e-4)
        assert f"unlike_training_data: feature distance {result['feature_distance']:.9g} > {threshold:.9g}" in \
            result["review_reason"]
    assert batch[0]["feature_distance"] == pytest.approx(reference_distance(like), rel=1e-4)
    assert "unlike_training_data" not in batch[0]["review_reason"]
    audited = [line for line in audit_lines(server) if line["request_id"] == single["request_id"]]
    assert audited[0]["feature_distance"] == single["feature_distance"]


def test_batch_limit(server):
    tiny = png(7)
    ok = post(server, "/predict/batch", json={"images": [b64(tiny)] * 10})
    assert ok.status_code == 200 and len(ok.json()["results"]) == 10
    too_many = post(server, "/predict/batch", files=[("files", ("x.png", tiny, "image/png"))] * 11)
    assert too_many.status_code in (413, 422)
    error = too_many.json()["error"]
    assert error["code"] == "too_many_images" and "10" in error["message"]
    empty = post(server, "/predict/batch", json={"images": []})
    assert empty.status_code == 422 and empty.json()["error"]["code"] == "no_images"
    # Past Starlette's own cap on multipart parts (1000), which answered 400 malformed_multipart.
    far_too_many = post(server, "/predict/batch", files=[("files", ("x.png", b"x", "image/png"))] * 1001)
    assert far_too_many.status_code == 413 and far_too_many.json()["error"]["code"] == "too_many_images", far_too_many.text


def test_batch_names_the_bad_image(server):
    response = post(server, "/predict/batch", json={"images": [b64(png(1)), b64(b"not an image")]})
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_image" and "image 1" in response.json()["error"]["message"]


# ---------------------------------------------------------------- /predict/explain
def heatmap(result: dict) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(result["heatmap_png_base64"])))
    image.load()
    return image


def test_explain_predicted_class(server, ckpt):
    response = post(server, "/predict/explain", files={"file": ("x.png", png(2), "image/png")})
    assert response.status_code == 200, response.text
    result = response.json()
    check_result(result, ckpt)
    assert result["target_class"] == result["label"]
    image = heatmap(result)
    assert image.format == "PNG" and image.size == (64, 64) and image.mode == "RGB"
    # where the overlay lies on the uploaded image: all of it here (the tiny model crops no border)
    height, width = xray_like(2).shape
    assert result["heatmap_region"] == load_classifier(ckpt).preprocessing.input_region(height, width)
    assert result["heatmap_region"] == {"x": 0, "y": 0, "width": width, "height": height}


@pytest.mark.parametrize("encoding, requested", [("json", "pneumonia"), ("multipart", " Pneumonia ")])
def test_explain_requested_class(server, encoding, requested):
    data = png(2)
    if encoding == "json":
        response = post(server, "/predict/explain", json={"image": b64(data), "target_class": requested})
    else:
        response = post(server, "/predict/explain", files={"file": ("x.png", data, "image/png")},
                        data={"target_class": requested})
    assert response.status_code == 200, response.text
    assert response.json()["target_class"] == "pneumonia"
    heatmap(response.json())
    audited = [line for line in audit_lines(server) if line["request_id"] == response.json()["request_id"]]
    assert [line["target_class"] for line in audited] == ["pneumonia"]


@pytest.mark.parametrize("target", ["fracture", "²", "7"])  # "²".isdigit() is true, int("²") fails
def test_explain_unknown_class(server, target):
    response = post(server, "/predict/explain", json={"image": b64(png(2)), "target_class": target})
    assert response.status_code == 422 and response.json()["error"]["code"] == "unknown_class"


# ---------------------------------------------------------------- bad input
BAD_INPUTS = {
    "not_an_image": (dict(files={"file": ("x.png", b"hello, not an image", "image/png")}), 422, "invalid_image"),
    "empty_body": (dict(data=b"", headers={**AUTH, "Content-Type": "application/json"}), 400, "empty_body"),
    "empty_file": (dict(files={"file": ("x.png", b"", "image/png")}), 422, "empty_image"),
    "truncated_png": (dict(files={"file": ("x.png", png(1)[:200], "image/png")}), 422, "invalid_image"),
    "truncated_jpeg": (dict(files={"file": ("x.jpg", encode(Image.fromarray(xray_like(1)), "JPEG")[:300],
                                            "image/jpeg")}), 422, "invalid_image"),
    "wrong_field_name": (dict(files={"image": ("x.png", png(1), "image/png")}), 422, "missing_field"),
    "wrong_json_key": (dict(json={"file": b64(png(1))}), 422, "missing_field"),
    "malformed_json": (dict(data=b'{"image": "abc', headers={**AUTH, "Content-Type": "application/json"}), 400,
                       "malformed_json"),
    "json_not_object": (dict(json=[1, 2]), 422, "invalid_request"),
    "malformed_base64": (dict(json={"image": "this is *not* base64!"}), 422, "invalid_base64"),
    # b64decode without validate=True would skip the '*' and decode the PNG around it
    "base64_with_a_stray_character": (dict(json={"image": b64(png(1))[:40] + "*" + b64(png(1))[40:]}), 422,
                                      "invalid_base64"),
    "base64_not_string": (dict(json={"image": 42}), 422, "invalid_base64"),
    "malformed_multipart": (dict(data=b"--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                                 headers={**AUTH, "Content-Type": "multipart/form-data; boundary=b"}),
                            400, "malformed_multipart"),  # cut short: was 422 missing_field, the file sent was dropped
    "dicom_without_pixels": (dict(json={"image": b64(make_dicom(None))}), 422, "dicom_without_pixels"),
    "dicom_window_width_0": (dict(json={"image": b64(make_dicom(gradient16(), header={0x00281050: "100",
                                                                                   0x00281051: "0"}))}),
                             422, "invalid_image"),
    "deeply_nested_json": (dict(data=b'{"image": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                headers={**AUTH, "Content-Type": "application/json"}), 400, "malformed_json"),
    # parseable, but too deep to be pickled to a worker (was a 500)
    "nested_json_metadata": (dict(json={"image": b64(png(1)), "meta": json.loads("[" * 600 + "]" * 600)}), 400,
                             "malformed_json"),
    "dicom_compression_without_decoder": (dict(json={"image": b64(labelled_htj2k(make_dicom(gradient16())))}), 415,
                                          "unsupported_dicom_compression"),
    "pixel_bomb": (dict(files={"file": ("bomb.png", png_bomb(), "image/png")}), 413, "image_too_large"),
    "payload_too_large": (dict(data=b"{" + b" " * (MAX_PAYLOAD + 10) + b"}",
                               headers={**AUTH, "Content-Type": "application/json"}), 413, "payload_too_large"),
    "unsupported_media_type": (dict(data=png(1), headers={**AUTH, "Content-Type": "image/png"}), 415,
                               "unsupported_media_type"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_answers_4xx_json_quickly(server, name):
    kwargs, status, code = BAD_INPUTS[name]
    kwargs = dict(kwargs)
    headers = kwargs.pop("headers", AUTH)
    started = time.monotonic()
    response = post(server, "/predict", headers=headers, **kwargs)
    elapsed = time.monotonic() - started
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["code"] == code
    assert elapsed < 5.0


def test_bad_input_on_batch_and_explain(server):
    bomb = post(server, "/predict/batch", files=[("files", ("b.png", png_bomb(), "image/png"))])
    assert bomb.status_code == 413 and bomb.json()["error"]["code"] == "image_too_large"
    wrong = post(server, "/predict/batch", files={"file": ("x.png", png(1), "image/png")})
    assert wrong.status_code == 422 and "'files'" in wrong.json()["error"]["message"]
    empty = post(server, "/predict/explain", data=b"", headers={**AUTH, "Content-Type": "application/json"})
    assert empty.status_code == 400 and empty.json()["error"]["code"] == "empty_body"
    broken = post(server, "/predict/explain", json={"image": b64(b"\x89PNG\r\n\x1a\nxx")})
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "invalid_image"


def test_good_and_bad_requests_in_one_dynamic_batch(server):
    """A bad image batched together with good ones fails alone."""
    payloads = [{"image": b64(png(i))} if i % 2 else {"image": b64(b"garbage")} for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda p: post(server, "/predict", json=p), payloads))
    assert [r.status_code for r in responses] == [422 if i % 2 == 0 else 200 for i in range(8)]


def test_unknown_route_and_method_are_json_errors(server):
    missing = requests.get(server.url + "/nope", timeout=10)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong_method = requests.get(server.url + "/predict", timeout=10)
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_server_still_serving_after_bad_input(server):
    assert requests.get(server.url + "/health", timeout=30).status_code == 200
    assert post(server, "/predict", files={"file": ("x.png", png(9), "image/png")}).status_code == 200


# ---------------------------------------------------------------- security
@pytest.mark.parametrize("path", ["/predict", "/predict/batch", "/predict/explain"])
@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "wrong"}], ids=["missing", "wrong"])
def test_api_key_enforced_on_model_endpoints(server, path, headers):
    field = "files" if path.endswith("batch") else "file"
    response = post(server, path, headers=headers, files={field: ("x.png", png(1), "image/png")})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


def test_cors(server):
    allowed = requests.options(server.url + "/predict", timeout=10, headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "X-API-Key"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == ORIGIN
    other = post(server, "/predict", headers={**AUTH, "Origin": "http://evil.example"},
                 files={"file": ("x.png", png(1), "image/png")})
    assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


# ---------------------------------------------------------------- audit
def audit_lines(server) -> list[dict]:
    if not server.audit_path.exists():
        return []
    return [json.loads(line) for line in server.audit_path.read_text().splitlines()]


def test_audit_log_under_concurrent_load(server):
    before = len(audit_lines(server))
    n = 40
    images = [png(100 + i) for i in range(n)]

    def one(i):
        if i % 4 == 0:
            return post(server, "/predict/batch", json={"images": [b64(images[i])]})
        return post(server, "/predict", files={"file": ("x.png", images[i], "image/png")})

    with ThreadPoolExecutor(16) as pool:
        responses = list(pool.map(one, range(n)))
    assert all(r.status_code == 200 for r in responses)
    lines = audit_lines(server)[before:]  # json.loads above fails on any interleaved line
    assert len(lines) == n
    ids = {r.json()["request_id"] if "request_id" in r.json() else r.json()["results"][0]["request_id"]
           for r in responses}
    assert {line["request_id"] for line in lines} == ids
    assert {line["image_sha256"] for line in lines} == {hashlib.sha256(d).hexdigest() for d in images}
    for line in lines:
        assert set(line) >= {"time", "request_id", "endpoint", "image_sha256", "model_sha256", "probabilities",
                             "label", "needs_review", "latency_ms"}
        assert not {"image", "pixels", "file"} & set(line)


def session_processes(session: int) -> dict[int, bytes]:
    """Pid -> command line of each running process in the server's session (an exited one not yet reaped has none)."""
    processes = {}
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == session:
                if cmdline := (entry / "cmdline").read_bytes():
                    processes[int(entry.name)] = cmdline
        except (OSError, ProcessLookupError):
            continue
    return processes


def inference_workers(session: int) -> list[int]:
    """Pids of LitServe's inference worker processes (multiprocessing spawns) in the server's session."""
    return sorted(pid for pid, cmdline in session_processes(session).items() if b"spawn_main" in cmdline)


def test_a_worker_that_dies_is_restarted_and_the_server_keeps_serving(ckpt, tmp_path):
    with start_server(ckpt, tmp_path, f"server.api_key={API_KEY}", "server.predict_workers=2") as server:
        workers = inference_workers(server.proc.pid)
        assert len(workers) == 4  # two /predict, one /predict/batch, one /predict/explain
        os.kill(workers[0], signal.SIGKILL)  # as the kernel's OOM killer would
        deadline = time.monotonic() + 90
        while server.health_status() != 200 or len(inference_workers(server.proc.pid)) < 4:
            assert server.proc.poll() is None, server.log()  # before, LitServe shut the whole server down
            assert time.monotonic() < deadline, server.log()
            time.sleep(1)
        assert workers[0] not in inference_workers(server.proc.pid)
        answer = requests.post(server.url + "/predict", headers=AUTH, files={"file": ("a.png", png(), "image/png")},
                               timeout=30)
        assert answer.status_code == 200, answer.text


def test_a_dead_http_server_process_stops_the_server_for_its_supervisor_to_restart(ckpt, tmp_path):
    """LitServe restarts inference workers, not its HTTP server process: killed, it left a port that accepted
    connections and never answered, with nothing restarted and no exit."""
    with start_server(ckpt, tmp_path) as server:
        watched = re.search(r"watching the HTTP server process\(es\) \[(\d+)\]", server.log())
        assert watched, server.log()
        os.kill(int(watched.group(1)), signal.SIGKILL)  # as the kernel's OOM killer would
        assert server.proc.wait(timeout=60) == 1, server.log()
        assert f"the HTTP server process {watched.group(1)} died" in server.log()


@pytest.mark.parametrize("stop", ["kill -TERM", "Ctrl-C"])
def test_a_stopped_server_exits_quietly_with_all_its_processes(ckpt, tmp_path, stop):
    with start_server(ckpt, tmp_path) as server:
        session = server.proc.pid
        assert len(inference_workers(session)) == 3
        if stop == "kill -TERM":  # docker stop, systemd: the server process only
            server.proc.send_signal(signal.SIGTERM)
        else:  # a terminal's Ctrl-C reaches every process of its foreground group
            os.killpg(session, signal.SIGINT)
        assert server.proc.wait(timeout=60) == 0, server.log()
        deadline = time.monotonic() + 10
        while session_processes(session) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert session_processes(session) == {}, server.log()
    log = server.log_path.read_text(errors="replace")
    # Before, the forked HTTP process and the workers each printed a traceback ending in KeyboardInterrupt. LitServe
    # 0.2.19's own worker monitor can still log a BrokenPipeError traceback when it wakes mid-shutdown (seen under
    # CI load): not ours to silence.
    assert "\nKeyboardInterrupt\n" not in log and "raise KeyboardInterrupt" not in log, log[-5000:]
    assert "Shutting down LitServe" in log, log[-5000:]


def test_a_multipart_body_with_an_epilogue_after_its_closing_boundary_is_served(server, reference):
    body = (b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png(1) + b"\r\n--xyz--\r\nthis epilogue is allowed (RFC 2046)\r\n")
    answer = post(server, "/predict", data=body, headers={**AUTH, "Content-Type": "multipart/form-data; boundary=xyz"})
    assert answer.status_code == 200, answer.text


def test_health_answers_503_when_the_probe_outlasts_server_health_timeout(ckpt, tmp_path):
    proc = start_server(ckpt, tmp_path, "server.health_timeout=0.000001")  # no probe comes back that fast
    try:
        deadline, body = time.monotonic() + 120, {}
        while body.get("error", {}).get("code") != "not_answering":  # 503 not_ready while the workers start
            assert proc.proc.poll() is None and time.monotonic() < deadline, (body, proc.log())
            time.sleep(0.5)
            try:
                answer = requests.get(proc.url + "/health", timeout=5)
                body = answer.json()
            except (requests.ConnectionError, ValueError):
                continue
            assert answer.status_code in (200, 503), answer.text
        answer = requests.post(proc.url + "/predict", files={"file": ("a.png", png(), "image/png")}, timeout=30)
        assert answer.status_code == 200, answer.text  # only the probe is held to the short deadline
    finally:
        proc.stop()


@pytest.mark.parametrize("setting, message", [
    ("server.health_timeout=0", "error: server.health_timeout must be a positive number of seconds, got 0"),
    ("server.backend=tensorrt", "error: server.backend must be 'torch' or 'onnx', got 'tensorrt'"),
    ("server.max_in_flight=0", "error: server.max_in_flight must be 1 or more, got 0"),
])
def test_a_bad_server_setting_is_one_message_before_the_server_starts(setting, message, ckpt, tmp_path):
    proc = start_server(ckpt, tmp_path, setting)
    assert proc.proc.wait(timeout=120) != 0
    log = proc.log()
    proc.stop()
    assert message in log and "Traceback" not in log, log
