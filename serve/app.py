"""cxr-serve: assemble the LitServer (three LitAPIs, guard, auth, CORS, errors) and run it.

    cxr-serve ckpt_path=best.ckpt [server.port=8000] [server.backend=onnx] [server.api_key=KEY]
"""
from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import hydra
import litserve as ls
from fastapi import Depends
from fastapi.exceptions import RequestValidationError
from litserve.server import RegularRequestHandler
from omegaconf import DictConfig, OmegaConf
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cxr import __version__
from cxr.checkpoint import file_sha256, public_calibration_fit, public_data_summary, read_spec
from cxr.config import CONFIG_DIR, ConfigError, log_config, user_errors
from cxr.data.preprocess import MAX_PIXEL_VALUE, Preprocessing
from serve.api import BatchAPI, ExplainAPI, PredictAPI, Settings
from serve.audit import AuditLog
from serve.errors import error_response, http_exception_response
from serve.middleware import RequestGuard
from serve.referral import Referral
from serve.requests import HealthProbe

log = logging.getLogger("serve.app")


def model_info(spec: dict, settings: Settings, server_cfg) -> dict:
    pre = spec["preprocessing"]
    referral = Referral.from_spec(spec, settings.review_confidence)
    return {
        "architecture": spec["backbone"],
        "backbone_kwargs": spec.get("backbone_kwargs", {}),
        "ensemble_size": spec.get("ensemble_size", 1),
        "class_names": list(spec["class_names"]),
        "input": {"size": [pre["in_chans"], pre["image_size"], pre["image_size"]], "channels": pre["in_chans"],
                  "normalization": {"mean": pre["mean"], "std": pre["std"], "max_pixel_value": MAX_PIXEL_VALUE},
                  "preprocessing": pre, "steps": Preprocessing.from_dict(pre).steps()},
        "temperature": float(spec.get("temperature", 1.0)),
        "logit_bias": spec.get("logit_bias"),
        "calibration_fit": public_calibration_fit(spec),
        "thresholds": referral.thresholds or None,
        "feature_distance": spec.get("feature_distance"),
        "review_confidence": referral.review_confidence,
        "referral_rule": referral.describe(),
        "checkpoint_sha256": settings.model_sha256,
        "backend": settings.backend,
        "training_data": public_data_summary(spec),
        "cxr_version": spec.get("cxr_version"),
        "package_version": __version__,
        "limits": {"max_images_per_request": settings.max_images_per_request,
                   "max_payload_bytes": int(server_cfg.max_payload_bytes), "max_pixels": settings.max_pixels,
                   "max_in_flight_per_api_server": int(server_cfg.max_in_flight)},
    }


def build_server(cfg: DictConfig) -> ls.LitServer:
    s = cfg.server
    spec = read_spec(cfg.ckpt_path)  # fail fast on a bad checkpoint, before any worker starts
    onnx_path = None
    if s.backend == "onnx":
        from serve.backends import ensure_onnx

        onnx_path = str(ensure_onnx(cfg.ckpt_path, s.onnx_path, cfg.paths.cache_dir))
    elif s.backend != "torch":
        raise ConfigError(f"server.backend must be 'torch' or 'onnx', got {s.backend!r}")
    if int(s.max_in_flight) < 1:
        raise ConfigError(f"server.max_in_flight must be 1 or more, got {s.max_in_flight!r}")
    if float(s.health_timeout) <= 0:
        raise ConfigError(f"server.health_timeout must be a positive number of seconds, got {s.health_timeout!r}")
    if float(s.deadline) <= float(s.timeout):
        raise ConfigError(f"server.deadline ({s.deadline!r}) must be longer than server.timeout ({s.timeout!r}): a "
                          "request may wait that long in the queue before a worker starts on it")
    settings = Settings(ckpt_path=str(Path(cfg.ckpt_path).resolve()), backend=s.backend, onnx_path=onnx_path,
                        api_key=str(s.api_key) if s.api_key else None,
                        audit_log=str(Path(s.audit_log).resolve()) if s.audit_log else None,
                        review_confidence=float(s.review_confidence), max_pixels=int(s.max_pixels),
                        max_images_per_request=int(s.max_images_per_request),
                        num_threads=s.threads, model_sha256=file_sha256(cfg.ckpt_path))
    AuditLog(settings.audit_log).ensure_writable()
    info = model_info(spec, settings, s)

    predict = PredictAPI(settings, max_batch_size=int(s.max_batch_size), batch_timeout=float(s.batch_timeout))
    apis = [predict, BatchAPI(settings), ExplainAPI(settings)]
    middlewares = [(RequestGuard, {"paths": [api.api_path for api in apis],
                                   "max_bytes": int(s.max_payload_bytes), "api_key": settings.api_key,
                                   "max_in_flight": int(s.max_in_flight), "deadline": float(s.deadline)})]
    if s.cors_origins:
        middlewares.append((CORSMiddleware, {"allow_origins": list(s.cors_origins), "allow_methods": ["GET", "POST"],
                                             "allow_headers": ["Content-Type", "X-API-Key"]}))
    # /predict may get more worker processes than the others: it is the endpoint under load, and one
    # single-threaded worker leaves the second of two cores idle.
    predict_workers = int(s.predict_workers or s.workers_per_device)
    workers = [predict_workers] + [int(s.workers_per_device)] * (len(apis) - 1)
    # restart_workers: a worker that dies (the kernel's OOM killer, a crash in a native library) is started again;
    # without it LitServe shuts the whole server down, failing every client, /health included.
    server = ls.LitServer(apis, accelerator="cpu", workers_per_device=workers, restart_workers=True,
                          timeout=float(s.timeout), model_metadata=info, middlewares=middlewares)
    install_routes(server, predict, info, health_timeout=float(s.health_timeout), deadline=float(s.deadline))
    return server


PROBE_PATIENCE = 3  # health timeouts a /health probe may take before it is taken as lost


def install_routes(server: ls.LitServer, predict: PredictAPI, info: dict, health_timeout: float,
                   deadline: float) -> None:
    app = server.app

    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return http_exception_response(exc.status_code, exc.detail, getattr(exc, "headers", None))

    async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
        return error_response(422, "invalid_request", str(exc.errors()))

    async def on_error(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(500, "internal_error", "internal server error")

    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(Exception, on_error)

    # Replace LitServe's /health: 200 only when the workers are up *and* a probe image makes the
    # round trip through the /predict inference queue.
    # LitServe's /info would publish the model metadata without the API key: /model/info replaces it.
    replaced = {server.healthcheck_path, server.info_path}
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in replaced]
    handler = RegularRequestHandler(predict, server)
    # One probe at a time: a probe that outlasts health_timeout is left to finish (later /health calls wait on it
    # instead of queueing more behind it), but not for ever: once it is PROBE_PATIENCE health timeouts old (or
    # server.deadline, if shorter) it is taken as lost (held by a worker that died, or by one restarted in its
    # place whose answer never comes back) and a new probe replaces it. One more probe every 30 s (the default)
    # is no load even on a server behind on its queue.
    lost_after = min(deadline, PROBE_PATIENCE * health_timeout)
    probe: asyncio.Task | None = None
    probe_started = 0.0

    @app.get(server.healthcheck_path)
    async def health() -> Response:
        nonlocal probe, probe_started
        status = getattr(server, "workers_setup_status", None) or {}
        if not status or not all(v == ls.server.WorkerSetupStatus.READY for v in status.values()):
            return error_response(503, "not_ready", "model workers are still starting")
        lost = probe is not None and not probe.done() and time.monotonic() - probe_started > lost_after
        if lost:  # left pending, not cancelled: /health calls still waiting on it time out on their own
            log.error("/health: the probe got no answer within %g s; sending a new one", lost_after)
        if probe is None or probe.done() or lost:
            probe, probe_started = asyncio.ensure_future(handler.handle_request(HealthProbe(), HealthProbe)), \
                time.monotonic()
            # Its failure (a 504 from the queue) is this /health call's answer, or nobody's once it is replaced:
            # read here, asyncio would log it as a "Task exception was never retrieved" traceback.
            probe.add_done_callback(lambda task: task.cancelled() or task.exception())
        try:
            answer = await asyncio.wait_for(asyncio.shield(probe), health_timeout)
        except Exception as exc:  # timeout or worker error
            return error_response(503, "not_answering", f"model did not answer a probe: {type(exc).__name__}")
        if getattr(answer, "status_code", 500) != 200:
            return error_response(503, "not_answering", "model probe failed")
        return JSONResponse({"status": "ok"})

    @app.get("/model/info", dependencies=[Depends(predict.authorize)])
    async def get_model_info() -> Response:
        return JSONResponse(info)


STOPPING = threading.Event()  # the main process was told to stop (Ctrl-C, SIGTERM)
HTTP_SERVER_CHECK_S = 1.0


def _interrupt(signum, frame):
    STOPPING.set()
    raise KeyboardInterrupt


def stop_if_an_http_server_dies(server: ls.LitServer) -> threading.Event:
    """LitServe restarts inference workers that die, never its HTTP server processes: one killed (the OOM killer
    picks the process holding every upload) left a port that accepts connections and never answers. The main
    process then stops the server instead, and exits 1 (main() checks the event returned), for its supervisor
    (Docker, systemd, Kubernetes) to start it again."""
    died = threading.Event()
    start_server = server._start_server  # LitServe 0.2.19's; the tests fail if a release renames it

    def start_and_watch(*args, **kwargs):
        http_servers = start_server(*args, **kwargs)
        processes = [p for p in http_servers.values() if isinstance(p, multiprocessing.process.BaseProcess)]
        log.info("watching the HTTP server process(es) %s", [p.pid for p in processes])

        def watch() -> None:
            while not STOPPING.wait(HTTP_SERVER_CHECK_S):
                dead = [p for p in processes if not p.is_alive()]
                if dead and not STOPPING.wait(HTTP_SERVER_CHECK_S):  # not a shutdown under way
                    log.error("the HTTP server process %d died (exit code %s): stopping, for the supervisor to start "
                              "cxr-serve again", dead[0].pid, dead[0].exitcode)
                    died.set()
                    server._shutdown_event.set()
                    return

        threading.Thread(target=watch, name="cxr-http-server-watch", daemon=True).start()
        return http_servers

    server._start_server = start_and_watch
    return died


def _leave_stopping_to_the_main_process() -> None:
    """In a process forked from cxr-serve's (LitServe's HTTP server, its multiprocessing manager), which the main
    process stops on its way out. Ctrl-C reaches every process of the terminal's group, so it is ignored here; and
    SIGTERM gets its default action back: uvicorn re-raises the SIGTERM it shut down on, and the inherited
    `_interrupt` turned that into a KeyboardInterrupt traceback."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="serve")
@user_errors
def main(cfg: DictConfig) -> None:
    log_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "server"]), log)
    log.info("server: %s", {k: ("***" if k == "api_key" and v else v) for k, v in cfg.server.items()})
    server = build_server(cfg)
    http_server_died = stop_if_an_http_server_dies(server)
    # SIGTERM (docker stop, test teardown) and Ctrl-C take LitServe's graceful path: workers are stopped too.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    os.register_at_fork(after_in_child=_leave_stopping_to_the_main_process)
    server.run(host=str(cfg.server.host), port=int(cfg.server.port), num_api_servers=int(cfg.server.num_api_servers),
               log_level=str(cfg.server.log_level), generate_client_file=False)
    if http_server_died.is_set():
        print("error: an HTTP server process died; cxr-serve stopped (see the log)", file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
