"""`wf serve` under load, against the simplest server a user would write, in the same run.

- wf serve: the cats_vs_dogs `finetune` model (or `--method`) of a runs folder (made by
  benchmarks/train_accuracy.py), on a local Ray cluster, with batching (default) and without
  (--max-batch-size 1), in its default ONNX runtime and in Keras (`--runtime keras`).
- plain: one process, `keras.saving.load_model`, Pillow to decode and resize, `model.predict`
  per request, behind Python's `http.server` (what a user writes in ten minutes).

An async client on 127.0.0.1 (aiohttp) sends the 800 validation photos, cycling, at 1, 8 and 32
requests in flight, each level bounded by a request count and a time limit; then 128 in flight
against a small queue, to show overload. Reported: requests per second, latency p50/p95/p99 of
the answered requests, and the share answered 503.

Usage: python benchmarks/serve_load.py [--runs DIR] [--requests 300] [--seconds 60]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PHOTOS = HERE.parent.parent / "shared" / "datasets" / "cats_vs_dogs" / "validation"

PLAIN_SERVER = r"""
import io, json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer
import keras, numpy as np
from PIL import Image
model = keras.saving.load_model(sys.argv[1], compile=False)
classes = json.load(open(sys.argv[2]))
size = model.input_shape[1:3]
class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        image = Image.open(io.BytesIO(data)).convert("RGB").resize((size[1], size[0]))
        p = model.predict(np.asarray(image, np.float32)[None], verbose=0).reshape(-1)
        p = np.array([1 - p[0], p[0]]) if len(p) == 1 else p
        body = json.dumps({"label": classes[int(p.argmax())],
                           "probabilities": dict(zip(classes, p.tolist()))}).encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers()
        self.wfile.write(b"ok")
HTTPServer(("127.0.0.1", int(sys.argv[3])), Handler).serve_forever()
"""


def wait_ready(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server ended: {process.communicate()[1][-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(1)
    sys.exit(f"{url} did not come up")


async def load(
    url: str, photos: list[bytes], in_flight: int, requests: int, seconds: float
) -> dict:
    import aiohttp

    latencies, statuses = [], []
    sent = 0
    started = time.perf_counter()

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() - started < seconds:
            body = photos[sent % len(photos)]
            sent += 1
            begun = time.perf_counter()
            try:
                async with session.post(url, data=body) as response:
                    await response.read()
                    statuses.append(response.status)
                    if response.status == 200:
                        latencies.append(time.perf_counter() - begun)
            except (TimeoutError, aiohttp.ClientError):
                statuses.append(0)  # refused, reset or timed out: counted as an error

    timeout = aiohttp.ClientTimeout(total=120)
    connector = aiohttp.TCPConnector(limit=in_flight)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000 if latencies else np.array([np.nan])
    return {
        "in_flight": in_flight, "requests": len(statuses), "ok": len(latencies),
        "rps": round(len(latencies) / elapsed, 1),
        **{f"p{q}_ms": round(float(np.percentile(ms, q)), 1) for q in (50, 95, 99)},
        "rejected_503": round(statuses.count(503) / max(len(statuses), 1), 3),
        "errors": statuses.count(0),
    }  # fmt: skip


def start_wf(runs: str, port: int, method: str, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "workflows.cli", "serve", "--runs", runs, "--port",
               str(port), "--datasets", "cats_vs_dogs", "--methods", method,
               "--num-cpus", "2", *extra]  # fmt: skip
    process = subprocess.Popen(command, cwd=HERE.parent, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True,
                               start_new_session=True)  # fmt: skip
    wait_ready(f"http://127.0.0.1:{port}/v2/health/ready", process)
    return process


def stop(process: subprocess.Popen) -> None:
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=str(HERE / "results" / "train" / "runs"))
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--port", type=int, default=18080)
    parser.add_argument("--method", default="finetune", help="the cats_vs_dogs job to serve")
    args = parser.parse_args()
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # the plain server gets it too
    model = Path(args.runs, "cats_vs_dogs", args.method, "model.keras")
    if not model.exists():
        sys.exit(f"no {model}: run benchmarks/train_accuracy.py first")
    photos = [p.read_bytes() for p in sorted(PHOTOS.rglob("*.jpg"))]
    levels, results = (1, 8, 32), {}

    def measure(name: str, url: str) -> None:
        for level in levels:
            results[f"{name} @{level}"] = asyncio.run(
                load(url, photos, level, args.requests, args.seconds)
            )
            print(name, results[f"{name} @{level}"], flush=True)

    plain = subprocess.Popen([sys.executable, "-c", PLAIN_SERVER, str(model),
                              str(model.parent / "classes.json"), str(args.port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # fmt: skip
    wait_ready(f"http://127.0.0.1:{args.port}/", plain)
    measure("plain keras + http.server", f"http://127.0.0.1:{args.port}/")
    stop(plain)
    url = f"http://127.0.0.1:{args.port}/v1/models/cats_vs_dogs/{args.method}:predict"
    for name, extra in (
        ("wf serve, batching", ()),
        ("wf serve, batching, keras runtime", ("--runtime", "keras")),
        ("wf serve, no batching", ("--max-batch-size", "1")),
    ):
        server = start_wf(args.runs, args.port, args.method, *extra)
        measure(name, url)
        stop(server)
    server = start_wf(args.runs, args.port, args.method, "--max-queued", "16")
    results["wf serve, overload @128"] = asyncio.run(
        load(url, photos, 128, args.requests * 2, args.seconds)
    )
    stop(server)
    from machine import banner, describe

    print("\n" + banner())
    header = ("server", "in flight", "req/s", "p50 ms", "p95 ms", "p99 ms", "503")
    print("{:<36} {:>9} {:>7} {:>8} {:>8} {:>8} {:>6}".format(*header))
    for name, r in results.items():
        print(f"{name.split(' @')[0]:<36} {r['in_flight']:>9} {r['rps']:>7} {r['p50_ms']:>8} "
              f"{r['p95_ms']:>8} {r['p99_ms']:>8} {r['rejected_503']:>6}")  # fmt: skip
    keras_runtime = results["wf serve, batching, keras runtime @32"]
    ours = results["wf serve, batching @32"]
    print(
        "\nonnx runtime against keras runtime at 32 in flight: "
        f"{ours['rps'] / keras_runtime['rps']:.2f}x req/s, p99 {ours['p99_ms']} ms against "
        f"{keras_runtime['p99_ms']} ms"
    )
    base = results["plain keras + http.server @32"]
    print(
        f"\nat 32 in flight: wf serve {ours['rps'] / base['rps']:.2f}x the plain server's "
        f"throughput, p99 {ours['p99_ms']} ms against {base['p99_ms']} ms "
        "(target: >= 2x at a lower p99)"
    )
    results["machine"] = describe()
    out = HERE / "results" / "serve_load.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
