"""Throughput and latency of `python -m paraformer_edu serve`, measured from another process.

    python benchmarks/bench_serve.py                        # the book's model, 1 and 2 workers
    python benchmarks/bench_serve.py --requests 200 --concurrency 16 --workers 1 2 4

For each number of workers the script starts the service on a free loopback port, waits
for /health, then sends a bounded load: `--requests` POSTs of test-split utterances of the
model's corpus, at most `--concurrency` in flight at once (threads of this process, which is
not the server's). It prints requests per second and the 50th and 95th percentile latencies
(ms), and the real-time factor the service reached (seconds of audio per second of wall
clock, inverted). Not a test: the figures depend on the machine and on what else runs.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

import paraformer_edu
from paraformer_edu.corpus import build_corpus, corpus_config, read_manifest

ROOT = Path(__file__).resolve().parent.parent


def start(checkpoint: Path, workers: int, threads: int) -> tuple[subprocess.Popen, str]:
    """The service on a free loopback port, once it answers /health."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([sys.executable, "-m", "paraformer_edu", "serve", "--checkpoint", str(checkpoint),
                                "--port", str(port), "--workers", str(workers), "--threads", str(threads)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            httpx.get(f"{url}/health", timeout=2)
            return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise RuntimeError("the service did not start")


def load(url: str, bodies: list[bytes], requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send `requests` POSTs, at most `concurrency` at once: (wall seconds, latencies in s)."""

    def one(i: int) -> float:
        start = time.perf_counter()
        reply = httpx.post(f"{url}/transcribe", content=bodies[i % len(bodies)], timeout=300)
        reply.raise_for_status()
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(requests)))
    return time.perf_counter() - start, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "paraformer-book" / "model.pt"))
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--threads", type=int, default=1, help="PyTorch threads per worker")
    args = parser.parse_args()
    recognizer = paraformer_edu.load_model(args.checkpoint)
    manifest = build_corpus(corpus_config(recognizer.config.data.corpus), splits=("test",))["test"]
    rows = read_manifest(manifest)[:50]
    bodies = [Path(r["audio_filepath"]).read_bytes() for r in rows]
    audio = sum(r["duration"] for r in rows) / len(rows)  # seconds per request, on average
    print(f"{args.requests} requests of {audio:.1f} s on average, {args.concurrency} in flight")
    print(f"{'workers':>7} {'requests/s':>10} {'p50 ms':>8} {'p95 ms':>8} {'RTF':>8}")
    for workers in args.workers:
        process, url = start(Path(args.checkpoint), workers, args.threads)
        try:
            load(url, bodies, 2 * args.concurrency, args.concurrency)  # warm-up
            wall, latencies = load(url, bodies, args.requests, args.concurrency)
        finally:
            process.terminate()
            process.wait(timeout=30)
        latencies.sort()
        p50, p95 = latencies[len(latencies) // 2], latencies[int(0.95 * (len(latencies) - 1))]
        rtf = wall / (args.requests * audio)
        print(f"{workers:>7} {args.requests / wall:>10.1f} {1000 * p50:>8.0f} {1000 * p95:>8.0f} {rtf:>8.4f}")


if __name__ == "__main__":
    main()
