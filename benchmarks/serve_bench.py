"""Benchmark cxr-serve on loopback with real X-rays (a script, not a test).

    python benchmarks/serve_bench.py --ckpt logs/train/runs/.../checkpoints/best.ckpt [--soak-seconds 120]

Measures, in one run: offline batched model throughput (in-process, no HTTP, at the server's thread
setting and on every core); /predict throughput and p50/p95/p99 latency at 1, 4 and 16 concurrent
clients for the torch and onnx backends, with the CPU seconds each server process used; /predict/explain
latency; and a soak at 16 clients counting errors and audit lines.
"""
from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import platform
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from serve.testing import start_server  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cxr"


def load_images(data_dir: Path, n: int) -> list[bytes]:
    with open(data_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows = [r for r in rows if r["split"] == "test"] or rows
    rng = np.random.default_rng(0)
    picked = rng.choice(len(rows), size=min(n, len(rows)), replace=False)
    return [(data_dir / rows[i]["path"]).read_bytes() for i in picked]


def percentiles(latencies: list[float]) -> dict:
    a = np.array(latencies) * 1000.0
    return {"p50_ms": float(np.percentile(a, 50)), "p95_ms": float(np.percentile(a, 95)),
            "p99_ms": float(np.percentile(a, 99)), "mean_ms": float(a.mean())}


def offline_throughput(backend_name: str, ckpt: str, images: list[bytes], batch_size: int, seconds: float,
                       threads: int, cache_dir: Path) -> dict:
    """The model alone, in this process: preprocessing + forward on batches of `batch_size`."""
    from cxr.data.decode import decode_image
    from serve.backends import ensure_onnx, make_backend

    onnx_path = ensure_onnx(ckpt, None, cache_dir) if backend_name == "onnx" else None
    backend = make_backend(backend_name, ckpt, onnx_path, threads)
    grays = [decode_image(b) for b in images]
    batch = [grays[i % len(grays)] for i in range(batch_size)]
    backend.predict(batch)  # warm-up
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        backend.predict(batch)
        done += batch_size
    elapsed = time.perf_counter() - started
    # With decoding too (what the server does per request), for reference.
    done_dec, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        backend.predict([decode_image(images[(done_dec + i) % len(images)]) for i in range(batch_size)])
        done_dec += batch_size
    elapsed_dec = time.perf_counter() - started
    return {"batch_size": batch_size, "images_per_s": done / elapsed,
            "images_per_s_with_decode": done_dec / elapsed_dec}


def multipart_body(image: bytes) -> tuple[bytes, str]:
    """One multipart/form-data body (field `file`), encoded once: the clients share this machine's two
    cores with the server, so per-request client work is kept to sending bytes and reading the answer."""
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="x.jpg"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n".encode() + image + f"\r\n--{boundary}--\r\n".encode())
    return body, f"multipart/form-data; boundary={boundary}"


def run_load(url: str, path: str, images: list[bytes], clients: int, n_requests: int | None = None,
             seconds: float | None = None) -> dict:
    """`clients` threads, each with one keep-alive connection, posting the images in turn."""
    bodies = [multipart_body(image) for image in images]
    host, port = urlsplit(url).hostname, urlsplit(url).port
    latencies, errors, lock = [], [], threading.Lock()
    counter = iter(range(10**9))
    deadline = time.monotonic() + seconds if seconds else None

    def worker() -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        while True:
            i = next(counter)
            if n_requests is not None and i >= n_requests:
                break
            if deadline is not None and time.monotonic() >= deadline:
                break
            body, content_type = bodies[i % len(bodies)]
            t0 = time.perf_counter()
            try:
                connection.request("POST", path, body=body, headers={"Content-Type": content_type})
                response = connection.getresponse()
                answer = response.read()
                ok = response.status == 200 and "label" in json.loads(answer)
                failure = response.status
            except Exception as exc:  # connection errors count as errors; reconnect
                ok, failure = False, repr(exc)
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=60)
            elapsed = time.perf_counter() - t0
            with lock:
                (latencies.append(elapsed) if ok else errors.append(str(failure)))
        connection.close()

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    out = {"clients": clients, "requests": len(latencies) + len(errors), "errors": len(errors),
           "throughput_rps": len(latencies) / wall, "wall_s": wall}
    if latencies:
        out.update(percentiles(latencies))
    if errors:
        out["error_samples"] = errors[:5]
    return out


def cpu_seconds(pgid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of each process in the server's process group, by command."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmdline = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        if int(fields[2]) != pgid:
            continue
        name = f"{stat.parent.name} {cmdline[:80]}".strip()
        out[name] = (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_breakdown(pgid: int, run) -> tuple[dict, dict]:
    """Run `run()`; return its result and the CPU seconds each server process and this client used meanwhile."""
    before, client_before = cpu_seconds(pgid), time.process_time()
    result = run()
    after, client = cpu_seconds(pgid), time.process_time() - client_before
    used = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    used = dict(sorted(((k, v) for k, v in used.items() if v > 0.05), key=lambda kv: -kv[1]))
    return result, {"server_processes": used, "client": round(client, 2), "wall_s": round(result["wall_s"], 2)}


def audit_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def bench_backend(args, backend: str, images: list[bytes], tmp: Path, results: dict) -> None:
    audit = tmp / f"audit-{backend}.jsonl"
    overrides = [f"server.backend={backend}", f"server.threads={args.threads}", f"server.audit_log={audit}",
                 f"server.max_batch_size={args.max_batch_size}",
                 f"server.batch_timeout={args.batch_timeout}", f"paths.cache_dir={tmp / 'cache'}",
                 *args.server_override]
    t0 = time.perf_counter()
    with start_server(args.ckpt, tmp / backend, *overrides) as server:
        results[backend] = {"startup_s": time.perf_counter() - t0, "levels": []}
        run_load(server.url, "/predict", images, 2, n_requests=20)  # warm-up
        for clients in (1, 4, 16):
            level, cpu = cpu_breakdown(server.proc.pid, lambda: run_load(
                server.url, "/predict", images, clients, n_requests=args.requests * max(1, clients // 2)))
            level["cpu_seconds"] = cpu
            results[backend]["levels"].append(level)
            print(backend, json.dumps(level), flush=True)
        if backend == "torch":
            run_load(server.url, "/predict/explain", images, 1, n_requests=3)
            results["explain"] = run_load(server.url, "/predict/explain", images, 1, n_requests=args.explain_requests)
            print("explain", json.dumps(results["explain"]), flush=True)
        if backend == args.soak_backend and args.soak_seconds > 0:
            before = audit_count(audit)
            soak = run_load(server.url, "/predict", images, 16, seconds=args.soak_seconds)
            time.sleep(1.0)
            soak["audit_lines"] = audit_count(audit) - before
            soak["lost_audit_lines"] = soak["requests"] - soak["errors"] - soak["audit_lines"]
            soak["backend"] = backend
            results["soak"] = soak
            print("soak", json.dumps(soak), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--images", type=int, default=64, help="real images cycled through")
    parser.add_argument("--requests", type=int, default=60, help="requests per client level (x clients/2)")
    parser.add_argument("--explain-requests", type=int, default=20)
    parser.add_argument("--soak-seconds", type=float, default=120.0)
    parser.add_argument("--soak-backend", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--backends", default="torch,onnx")
    parser.add_argument("--server-override", action="append", default=[],
                        help="extra cxr-serve override, e.g. server.num_api_servers=2 (repeatable)")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--batch-timeout", type=float, default=0.01)
    parser.add_argument("--offline-seconds", type=float, default=10.0)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per model (server.threads)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    images = load_images(args.data, args.images)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "load_avg_at_start": os.getloadavg()},
               "args": {k: str(v) for k, v in vars(args).items()}, "n_images": len(images),
               "mean_image_kb": sum(map(len, images)) / len(images) / 1024}
    with tempfile.TemporaryDirectory(prefix="cxr-bench-") as tmp:
        results["offline"] = {}
        for backend in args.backends.split(","):
            # The server's thread setting, and every core: the ratio is taken against the faster of the two,
            # so a server that uses more processes or threads than the offline run is not flattered.
            results["offline"][backend] = {
                f"threads_{threads}": offline_throughput(backend, args.ckpt, images, args.max_batch_size,
                                                         args.offline_seconds, threads, Path(tmp) / "cache")
                for threads in sorted({args.threads, os.cpu_count()})}
            print("offline", backend, json.dumps(results["offline"][backend]), flush=True)
        for backend in args.backends.split(","):
            bench_backend(args, backend, images, Path(tmp), results)
            offline = max(run["images_per_s"] for run in results["offline"][backend].values())
            served = results[backend]["levels"][-1]["throughput_rps"]
            results[backend]["ratio_16_clients_to_offline"] = served / offline
            print(backend, f"16 clients / best offline = {served:.1f} / {offline:.1f} = {served / offline:.2f}",
                  flush=True)
    results["machine"]["load_avg_at_end"] = os.getloadavg()
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
