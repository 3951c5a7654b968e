"""Bounded load test of the cloud server on loopback: dynamic batching on (max_batch_size=8) vs off (1).

Starts one `alignedvq serve` subprocess per configuration on 127.0.0.1 (both at once, so their start-ups
overlap), then for each in turn runs ``--concurrency`` clients that post AlignedVQ frames back to back for
``--duration`` seconds, and prints a table: throughput, p50/p99 latency, mean batch size, 503s and errors.
Every request loop is bounded in time and count; the script exits 1 if any request failed (anything but
200 or 503).

    python benchmarks/load_test.py                       # a tiny random model, about a minute
    python benchmarks/load_test.py --model MODEL_DIR --concurrency 32 --duration 20

Frames carry random indices and easy-VQA-style questions: the server's work does not depend on where the
indices came from, and the load generator then needs neither the edge model nor images.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

QUESTIONS = ["what color is the shape ?", "does the image contain a circle ?", "what shape is in the image ?",
             "is there a red triangle in the picture ?", "is there not a blue shape ?"]


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as probe:
        return probe.getsockname()[1]


def make_frames(info: dict, count: int, seed: int = 0) -> list[bytes]:
    from transformers_alignedvq import wire

    rng = np.random.default_rng(seed)
    shape = (info["num_tokens"],) if info["codes_per_token"] == 1 else (info["num_tokens"], info["codes_per_token"])
    return [
        wire.encode_frame(
            rng.integers(0, info["codebook_size"], size=shape), codebook_size=info["codebook_size"],
            codebook_fingerprint=bytes.fromhex(info["codebook_fingerprint"]), prompt=QUESTIONS[i % len(QUESTIONS)],
            grid=tuple(info["grid"]), has_cls_token=info["has_cls_token"],
        )
        for i in range(count)
    ]


def start_server(model: str, port: int, args, max_batch_size: int) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "transformers_alignedvq.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(args.max_queue), "--max-new-tokens", str(args.max_new_tokens),
        "--threads", str(args.threads), "--log-level", "warning",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(process: subprocess.Popen, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{process.stderr.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server at {url} not ready after {timeout} s")


async def run_load(url: str, frames: list[bytes], *, concurrency: int, duration: float, max_requests: int,
                   timeout: float) -> dict:
    latencies: list[float] = []
    batch_sizes: list[int] = []
    counts = {"ok": 0, "503": 0, "errors": 0}
    error_examples: list[str] = []
    sent = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker(index: int) -> None:
            nonlocal sent
            i = index
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                began = time.perf_counter()
                try:
                    response = await client.post("/v1/answer", content=frames[i % len(frames)],
                                                 headers={"Content-Type": "application/octet-stream"})
                except httpx.HTTPError as exc:
                    counts["errors"] += 1
                    error_examples.append(f"{type(exc).__name__}: {exc}")
                    continue
                finally:
                    i += concurrency
                if response.status_code == 200:
                    counts["ok"] += 1
                    latencies.append(time.perf_counter() - began)
                    batch_sizes.append(response.json()["batch_size"])
                elif response.status_code == 503:
                    counts["503"] += 1
                    await asyncio.sleep(0.01)
                else:
                    counts["errors"] += 1
                    error_examples.append(f"{response.status_code}: {response.text[:200]}")

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        **counts,
        "elapsed": elapsed,
        "throughput": counts["ok"] / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "mean_batch": statistics.fmean(batch_sizes) if batch_sizes else float("nan"),
        "error_examples": error_examples[:3],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: a tiny random model written to a temp folder)")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent clients")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    parser.add_argument("--max-requests", type=int, default=20_000, help="hard cap per configuration")
    parser.add_argument("--batch-sizes", default="8,1", help="max_batch_size values to compare")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    from transformers_alignedvq.edge_export import describe_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model is None:
            from transformers_alignedvq.testing import save_tiny_deployment

            model = str(save_tiny_deployment(Path(scratch) / "tiny"))
            print(f"no --model: using a tiny random model ({model})")
        info = describe_checkpoint(model)
        frames = make_frames(info, 64)
        servers = {}
        try:
            for size in batch_sizes:
                port = free_port()
                servers[size] = (start_server(model, port, args, size), f"http://127.0.0.1:{port}")
            results = {}
            for size, (process, url) in servers.items():
                wait_ready(process, url, timeout=300)
                asyncio.run(run_load(url, frames, concurrency=args.concurrency, duration=args.warmup,
                                     max_requests=args.max_requests, timeout=args.timeout))
                results[size] = asyncio.run(run_load(url, frames, concurrency=args.concurrency, duration=args.duration,
                                                     max_requests=args.max_requests, timeout=args.timeout))
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()

    print(f"\n{args.concurrency} concurrent clients, {args.duration:.0f} s per configuration, "
          f"max_new_tokens={args.max_new_tokens}, frame {len(frames[0])} B, {args.threads} torch thread(s)/server")
    header = (f"{'max_batch_size':>14} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} {'mean batch':>10} "
              f"{'503':>5} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for size, r in results.items():
        print(f"{size:>14} {r['ok']:>8} {r['throughput']:>7.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_batch']:>10.2f} {r['503']:>5} {r['errors']:>6}")
    if len(results) >= 2 and 1 in results:
        best = max(size for size in results)
        speedup = results[best]["throughput"] / results[1]["throughput"]
        print(f"batching speed-up (max_batch_size={best} vs 1): {speedup:.2f}x")
    failures = [(size, r["error_examples"]) for size, r in results.items() if r["errors"]]
    for size, examples in failures:
        print(f"errors with max_batch_size={size}: {examples}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
