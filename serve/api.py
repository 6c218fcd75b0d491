"""The LitAPIs: /predict (dynamically batched), /predict/batch (one forward pass), /predict/explain.

Each runs in LitServe inference worker processes: `setup` loads the model there; `decode_request`
turns the parsed payload into greyscale images (through cxr.data.decode.decode_image); `predict`
runs the model; `encode_response` builds the result, writes the audit line and returns a JSON
response (or the JSON error for that one request, so one bad image never fails a dynamic batch).
"""
from __future__ import annotations

import base64
import hmac
import logging
import signal
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import litserve as ls
import numpy as np
from fastapi import Header
from starlette.responses import JSONResponse, Response

from serve.audit import AuditLog
from serve.errors import ServeError, error_response
from serve.referral import Referral
from serve.requests import DecodedImage, HealthProbe, decode_bytes, image_bytes, target_class

log = logging.getLogger("serve.api")


def ignore_ctrl_c() -> None:
    """In an inference worker: Ctrl-C reaches every process of the terminal's group, but the server process stops
    its workers itself (SIGTERM); a KeyboardInterrupt here only printed a traceback from LitServe's loop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Settings:
    """What the workers need; plain values so it pickles into LitServe's spawned processes."""

    ckpt_path: str
    backend: str = "torch"
    onnx_path: Optional[str] = None
    api_key: Optional[str] = None
    audit_log: Optional[str] = None
    review_confidence: float = 0.6
    max_pixels: int = 50_000_000
    max_images_per_request: int = 10
    num_threads: Optional[int] = None
    model_sha256: str = ""


@dataclass
class Job:
    request_id: str
    started: float
    image: Optional[DecodedImage] = None
    error: Optional[ServeError] = None
    probe: bool = False
    extra: dict = field(default_factory=dict)


def per_image(probabilities: np.ndarray, distances: np.ndarray | None) -> list[tuple[np.ndarray, float | None]]:
    """A backend's (N, C) probabilities and (N,) feature distances (or None) as one (probabilities, distance) per image."""
    return list(zip(probabilities, [None] * len(probabilities) if distances is None else distances))


def _new_job() -> Job:
    return Job(request_id=uuid.uuid4().hex, started=time.perf_counter())


class CxrAPI(ls.LitAPI):
    endpoint = "/predict"

    def __init__(self, settings: Settings, **kwargs):
        super().__init__(api_path=self.endpoint, **kwargs)
        self.settings = settings

    # FastAPI dependency for every route of this API (LitServe >= 0.2.19 per-API auth).
    def authorize(self, x_api_key: Optional[str] = Header(default=None, alias="X-API-Key")) -> None:
        expected = self.settings.api_key
        if expected and not (x_api_key and hmac.compare_digest(x_api_key.encode(), expected.encode())):
            raise ServeError(401, "unauthorized", "missing or wrong API key: send it in the X-API-Key header")

    def setup(self, device) -> None:
        from serve.backends import make_backend

        ignore_ctrl_c()
        s = self.settings
        self.backend = make_backend(s.backend, s.ckpt_path, s.onnx_path, s.num_threads)
        self.backend_name = self.backend.name
        self.class_names = list(self.backend.spec["class_names"])
        self.referral = Referral.from_spec(self.backend.spec, s.review_confidence)
        self.audit = AuditLog(s.audit_log)
        self.backend.predict([np.zeros((64, 64), np.uint8)])  # warm-up: READY means answering

    def _decode_one(self, request) -> Job:
        job = _new_job()
        data = image_bytes(request, many=False)[0]
        job.image = decode_bytes(data, self.settings.max_pixels)
        return job

    def result(self, job: Job, scored: tuple[np.ndarray, float | None], endpoint: str, index: int | None = None,
               audit_extra: dict | None = None) -> dict:
        """`scored`: the image's calibrated probabilities and its feature distance (None without one fitted)."""
        probabilities, distance = scored
        distance = None if distance is None else float(distance)
        label, confidence, needs_review, reason = self.referral.decide(probabilities, distance)
        probs = {name: float(p) for name, p in zip(self.class_names, probabilities)}
        latency_ms = (time.perf_counter() - job.started) * 1000.0
        result = {"label": label, "probabilities": probs, "confidence": confidence, "needs_review": needs_review,
                  "review_reason": reason, "feature_distance": distance, "model_sha256": self.settings.model_sha256,
                  "request_id": job.request_id, "latency_ms": round(latency_ms, 3)}
        audit = {"request_id": job.request_id, "endpoint": endpoint, "image_sha256": job.image.sha256,
                 "model_sha256": self.settings.model_sha256, "backend": self.backend_name,
                 "probabilities": probs, "label": label, "needs_review": needs_review, "review_reason": reason,
                 "feature_distance": distance, "latency_ms": result["latency_ms"]}
        if index is not None:
            audit["index"] = index
        self.audit.write({**audit, **(audit_extra or {})})
        return result


class PredictAPI(CxrAPI):
    """POST /predict: one image. Requests are grouped by LitServe's dynamic batching."""

    endpoint = "/predict"

    def decode_request(self, request):
        if isinstance(request, HealthProbe):
            job = _new_job()
            job.probe = True
            job.image = DecodedImage(np.zeros((64, 64), np.uint8), "")
            return job
        try:
            return self._decode_one(request)
        except ServeError as exc:  # answered per request in encode_response; the batch goes on
            error = exc
        except Exception:  # unforeseen: this request fails alone, not the dynamic batch it would join
            log.exception("decoding a /predict request failed")
            error = ServeError(500, "internal_error", "the request could not be decoded")
        job = _new_job()
        job.error = error
        return job

    def batch(self, inputs):
        return list(inputs)

    def predict(self, x):
        jobs = x if isinstance(x, list) else [x]
        ok = [job for job in jobs if job.error is None]
        try:
            by_id = dict(zip(map(id, ok), per_image(*self.backend.predict_scored([job.image.gray for job in ok])))) \
                if ok else {}
        except Exception:  # an image the model cannot take fails its own request, not the batch it joined
            log.exception("a batch of %d failed; predicting its images one by one", len(ok))
            by_id = {}
            for job in ok:
                try:
                    by_id[id(job)] = per_image(*self.backend.predict_scored([job.image.gray]))[0]
                except Exception:
                    log.exception("the model failed on request %s", job.request_id)
                    job.error = ServeError(500, "internal_error", "the model failed on this image")
        outputs = [(job, by_id.get(id(job))) for job in jobs]
        return outputs if isinstance(x, list) else outputs[0]

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output) -> Response:
        job, scored = output
        if job.error is not None:
            return error_response(job.error.status_code, job.error.detail["code"], job.error.detail["message"])
        if job.probe:
            return JSONResponse({"status": "ok"})
        return JSONResponse(self.result(job, scored, self.endpoint))


class BatchAPI(CxrAPI):
    """POST /predict/batch: 1..max_images_per_request images, one forward pass, results in order."""

    endpoint = "/predict/batch"

    def decode_request(self, request):
        limit = self.settings.max_images_per_request
        blobs = image_bytes(request, many=True)
        if not blobs:
            raise ServeError(422, "no_images", f"send 1 to {limit} images")
        if len(blobs) > limit:
            raise ServeError(413, "too_many_images", f"{len(blobs)} images sent; the limit is {limit} per request")
        jobs = []
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        for i, data in enumerate(blobs):
            try:
                image = decode_bytes(data, self.settings.max_pixels)
            except ServeError as exc:
                raise ServeError(exc.status_code, exc.detail["code"], f"image {i}: {exc.detail['message']}") from exc
            jobs.append(Job(request_id=request_id, started=started, image=image))
        return jobs

    def predict(self, jobs):
        return jobs, per_image(*self.backend.predict_scored([job.image.gray for job in jobs]))

    def encode_response(self, output) -> Response:
        jobs, scored = output
        results = [self.result(job, s, self.endpoint, index=i) for i, (job, s) in enumerate(zip(jobs, scored))]
        return JSONResponse({"results": results})


class ExplainAPI(CxrAPI):
    """POST /predict/explain: prediction plus a Grad-CAM overlay (PyTorch model, whatever the backend)."""

    endpoint = "/predict/explain"

    def setup(self, device) -> None:
        from cxr.explain import GradCamExplainer
        from serve.backends import TorchBackend

        ignore_ctrl_c()
        s = self.settings
        torch_backend = TorchBackend(s.ckpt_path, s.num_threads)
        self.backend_name = torch_backend.name  # whatever server.backend says: the audit names what answered
        self.class_names = torch_backend.classifier.class_names
        self.referral = Referral.from_spec(torch_backend.spec, s.review_confidence)
        self.audit = AuditLog(s.audit_log)
        self.explainer = GradCamExplainer(torch_backend.classifier)
        self.explainer.explain(np.zeros((64, 64), np.uint8))  # warm-up

    def decode_request(self, request):
        job = self._decode_one(request)
        target = target_class(request)
        if target is not None:
            try:
                self.explainer.class_index(target, np.zeros(len(self.class_names)))
            except KeyError as exc:
                raise ServeError(422, "unknown_class", str(exc.args[0])) from exc
        job.extra["target"] = target
        return job

    def predict(self, job):
        return job, self.explainer.explain(job.image.gray, job.extra["target"])

    def encode_response(self, output) -> Response:
        job, explanation = output
        result = self.result(job, (explanation.probabilities, explanation.feature_distance), self.endpoint,
                             audit_extra={"target_class": explanation.target_class})
        result["target_class"] = explanation.target_class
        result["heatmap_png_base64"] = base64.b64encode(explanation.overlay_png).decode()
        result["heatmap_region"] = explanation.region
        return JSONResponse(result)
