"""Reliability of the cloud server against hostile and unlucky clients, on loopback: one table of cases.

Starts `alignedvq serve` processes on 127.0.0.1 (the bundled easy-VQA model unless ``--model``), each with its
output in a log file, and runs:

* idle + slow: ``--idle`` connections that send nothing (from 4 processes, each with its open-file limit
  raised) and ``--slow`` clients sending 1 byte/s (half the head, half the body), while a prober sends valid
  requests on fresh connections. Failures: probes not answered 200, slow clients held past their deadline.
  Also measured: probe p99, server log growth, the most descriptors the server held.
* fuzz: ``--fuzz`` requests (mutated frames, wrong headers, methods, paths, framing, bytes that are not HTTP).
  Failures: 5xx other than 503.
* auth: a server with API keys, requests with no key, wrong keys, wrong schemes, on every route but /healthz.
  Failures: any answer other than 401.
* health: a server whose model starts failing after its warm-up (``serve()`` with a patched generate).
  Failures among the checks: /healthz 503 after a failed batch, no exception text or path in the 500, no model
  path in /v1/model, no /openapi.json or /docs.
* clients that leave: clients that send a whole request and close at once. Failures: jobs computed for them.
* costly frames: 4 threads flood the server with one kind of frame (a bad CRC, the cheap baseline; a 21-byte
  coded frame with an empty payload; a valid coded frame with the longest question) while a prober sends valid
  requests. Failures: probes not answered 200; measured: the probe's p50 and p99 against no flood.
* SIGTERM: ``--in-flight`` requests, then SIGTERM once the server has them all. Failures: connection errors or
  answers other than 200/503; the exit time is reported.

Every case is bounded in time; all servers and client processes are stopped at the end.

    python benchmarks/reliability.py                 # about 3 minutes on 2 CPU cores
    python benchmarks/reliability.py --idle 2000 --fuzz 2000 --slow 20     # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import random
import resource
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).parent))
from load_test import free_port, make_frames, wait_ready  # noqa: E402

KEY = "reliability-benchmark-key-0123456789"
FAILING_SERVER = """
import sys
from transformers_alignedvq.serving import serve
from transformers_alignedvq.serving.engines.transformers import TransformersAnswerEngine
generate, calls = TransformersAnswerEngine.generate, []
def failing(self, batch):  # the warm-up passes, every batch after it fails
    calls.append(1)
    if len(calls) > 1:
        raise RuntimeError("CUDA error: device-side assert triggered in /opt/private/models/secret.py")
    return generate(self, batch)
TransformersAnswerEngine.generate = failing
serve(sys.argv[1], port=int(sys.argv[2]), max_new_tokens=8)
"""


class Server:
    """One server process on loopback, its output in a log file."""

    def __init__(self, name: str, model: str, scratch: Path, args: list[str] = (), env: dict | None = None,
                 launcher: str | None = None):
        self.port, self.log = free_port(), scratch / f"{name}.log"
        self.url = f"http://127.0.0.1:{self.port}"
        command = ([sys.executable, "-c", launcher, model, str(self.port)] if launcher else
                   [sys.executable, "-m", "transformers_alignedvq.cli", "serve", "--model", model,
                    "--port", str(self.port), "--threads", "1", "--max-new-tokens", "8", *args])
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})

    def ready(self) -> "Server":
        wait_ready(self.process, self.url, timeout=300)
        return self

    def log_bytes(self) -> int:
        return self.log.stat().st_size

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.process.pid}/fd"))

    def health(self) -> dict:
        return httpx.get(f"{self.url}/healthz", timeout=10).json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()


def request_bytes(body: bytes, *, path: str = "/v1/answer", method: str = "POST", headers: dict | None = None) -> bytes:
    fields = {"Host": "127.0.0.1", "Content-Type": "application/octet-stream", "Content-Length": str(len(body)),
              "Connection": "close", **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items() if v is not None)
    return head.encode("latin-1") + b"\r\n" + body


async def exchange(port: int, data: bytes, timeout: float = 10.0) -> int | None:
    """Send ``data`` on a fresh connection; the answer's status, or None if the server closed without one."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(data)
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), timeout)
        await asyncio.wait_for(reader.read(), timeout)
    except (ConnectionError, asyncio.IncompleteReadError):
        return None
    finally:
        writer.close()
    parts = line.split()
    return int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else None


async def run_all(coroutines, concurrency: int) -> list:
    semaphore = asyncio.Semaphore(concurrency)

    async def bounded(coroutine):
        async with semaphore:
            try:
                return await coroutine
            except (OSError, asyncio.TimeoutError) as exc:
                return exc

    return await asyncio.gather(*(bounded(c) for c in coroutines))


# ---------------------------------------------------------------------------------------------------------
def hold_idle(port: int, count: int, source: str, hold_until: float, results) -> None:
    """Child process: open ``count`` connections that send nothing, hold them, report how many the server
    closed."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    sockets, failed = [], 0
    for _ in range(count):
        sock = socket.socket()
        sock.settimeout(3)
        try:
            sock.bind((source, 0))
            sock.connect(("127.0.0.1", port))
            sockets.append(sock)
        except OSError:
            failed += 1
            sock.close()
    time.sleep(max(0.0, hold_until - time.time()))
    closed = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            closed += sock.recv(1, socket.MSG_PEEK) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        sock.close()
    results.put((len(sockets), failed, closed))


async def slow_client(port: int, data: bytes, send_before: int, hold_max: float) -> float | None:
    """Send ``data[:send_before]`` at once, then 1 byte/s; seconds until the server closed (None: never)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(data[:send_before])
    closed = asyncio.ensure_future(reader.read())
    try:
        for byte in data[send_before:]:
            if closed.done() or time.monotonic() - start > hold_max:
                break
            writer.write(bytes([byte]))
            await asyncio.wait({closed}, timeout=1.0)
        await asyncio.wait_for(asyncio.shield(closed), max(0.0, hold_max - (time.monotonic() - start)))
        return time.monotonic() - start
    except (asyncio.TimeoutError, ConnectionError):
        return None if not closed.done() else time.monotonic() - start
    finally:
        closed.cancel()
        writer.close()


async def probe(url: str, frame: bytes, until: float, interval: float) -> list[tuple[int | None, float]]:
    results = []
    async with httpx.AsyncClient(timeout=10, limits=httpx.Limits(max_keepalive_connections=0)) as client:
        while time.monotonic() < until:
            start = time.monotonic()
            try:
                status = (await client.post(f"{url}/v1/answer", content=frame,
                                            headers={"Content-Type": "application/octet-stream"})).status_code
            except httpx.HTTPError:
                status = None
            results.append((status, time.monotonic() - start))
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - start)))
    return results


def case_idle_and_slow(server: Server, frame: bytes, args) -> list[dict]:
    log_before, hold = server.log_bytes(), args.hold
    hold_until = time.time() + hold
    queue = multiprocessing.Queue()
    holders = [multiprocessing.Process(target=hold_idle, args=(server.port, args.idle // 4, f"127.0.0.{k + 2}",
                                                                hold_until, queue)) for k in range(4)]
    for holder in holders:
        holder.start()
    fds = []

    async def run():
        async def watch_fds():
            while time.time() < hold_until:
                fds.append(server.open_fds())
                await asyncio.sleep(0.5)

        head = request_bytes(frame)
        head_size = head.index(b"\r\n\r\n") + 4
        half = args.slow // 2
        slow = [slow_client(server.port, head, 10, hold) for _ in range(half)]
        slow += [slow_client(server.port, head, head_size, hold) for _ in range(args.slow - half)]
        results = await asyncio.gather(probe(server.url, frame, time.monotonic() + hold, 0.1), watch_fds(), *slow)
        return results[0], results[2:2 + half], results[2 + half:]

    probes, slow_heads, slow_bodies = asyncio.run(run())
    idle = [queue.get(timeout=60) for _ in holders]
    for holder in holders:
        holder.join(30)
    latencies = sorted(seconds for status, seconds in probes if status == 200)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan")
    opened, refused, closed = (sum(column) for column in zip(*idle))
    late_heads = sum(held is None or held > args.header_timeout + 2 for held in slow_heads)
    late_bodies = sum(held is None or held > args.body_timeout + 2 for held in slow_bodies)
    growth = server.log_bytes() - log_before
    return [
        {"test": f"valid requests during {args.idle:,} idle + {args.slow} slow connections", "tried": len(probes),
         "failures": sum(status != 200 for status, _ in probes),
         "notes": f"p99 {p99:.2f} s; server log +{growth / 1e6:.2f} MB; at most {max(fds)} open fds; "
                  f"{opened:,} idle opened ({refused} refused), {closed:,} closed by the server"},
        {"test": "slow heads closed (cap or --header-timeout)", "tried": len(slow_heads), "failures": late_heads,
         "notes": f"held {_span(slow_heads)} s (limit {args.header_timeout:g} s)"},
        {"test": "slow bodies closed at --body-timeout", "tried": len(slow_bodies), "failures": late_bodies,
         "notes": f"held {_span(slow_bodies)} s (limit {args.body_timeout:g} s)"},
    ]


def _span(values) -> str:
    held = [v for v in values if v is not None]
    return f"{min(held):.1f}-{max(held):.1f}" if held else "-"


# ---------------------------------------------------------------------------------------------------------
def fuzz_request(rng: random.Random, frame: bytes) -> bytes:
    family = rng.randrange(6)
    body = bytearray(frame)
    if family == 0:  # a mutated frame, framed correctly; every third one with a valid CRC
        for _ in range(rng.randint(1, 4)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        if rng.random() < 0.3:
            body = body[: rng.randrange(len(body))]
        if rng.random() < 0.33 and len(body) > 4:
            body = body[:-4] + struct.pack("<I", zlib.crc32(bytes(body[:-4])))
        return request_bytes(bytes(body))
    if family == 1:  # wrong or odd headers around a good frame
        header = rng.choice(["Content-Type", "Content-Encoding", "Authorization", "Expect", "Transfer-Encoding",
                             "X-Forwarded-For", "Host"])
        value = rng.choice(["", "text/plain", "gzip", "Bearer x", "100-continue", "identity", "\x7f\x01",
                            "a" * rng.randint(1, 4000), "application/octet-stream; charset=utf-8"])
        return request_bytes(frame, headers={header: value})
    if family == 2:  # other methods and paths
        method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"])
        path = rng.choice(["/", "/v1/answer", "/v1/model", "/healthz", "/openapi.json", "/docs", "/v1/answer/..",
                           "/%00", "/" + "x" * rng.randint(1, 3000), "/v1/answer?x=1&x=2", "//v1//answer"])
        return request_bytes(frame if rng.random() < 0.5 else b"", path=path, method=method)
    if family == 3:  # bad Content-Length values (never larger than the body: that is the slow-body case)
        value = rng.choice(["-1", "abc", "1e3", " 5", str(len(frame) // 2), "0", "99999999999999999999"])
        return request_bytes(frame, headers={"Content-Length": value})
    if family == 4:  # chunked bodies, well or badly formed, always terminated
        chunks = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n" for part in (frame[:10], frame[10:]))
        if rng.random() < 0.5:
            chunks = chunks.replace(b"\r\n", rng.choice([b"\n", b"\r\r", b";x=y\r\n"]), 1)
        return (request_bytes(b"", headers={"Content-Length": None, "Transfer-Encoding": "chunked"})
                + chunks + b"0\r\n\r\n")
    garbage = bytes(rng.randrange(256) for _ in range(rng.randint(1, 300)))  # not HTTP at all
    return garbage.replace(b"\r\n\r\n", b"") + b"\r\n\r\n"


def case_fuzz(server: Server, frame: bytes, count: int) -> dict:
    rng, log_before = random.Random(0), server.log_bytes()
    requests = [fuzz_request(rng, frame) for _ in range(count)]
    outcomes = asyncio.run(run_all((exchange(server.port, data) for data in requests), 32))
    statuses = [o for o in outcomes if isinstance(o, int)]
    bad = sum(s >= 500 and s != 503 for s in statuses)
    counts = {label: sum(lo <= s < hi for s in statuses) for label, lo, hi in
              (("2xx", 200, 300), ("4xx", 400, 500), ("503", 503, 504))}
    no_answer = sum(o is None for o in outcomes)
    errors = sum(isinstance(o, Exception) for o in outcomes)
    return {"test": "fuzzed requests: no 5xx but 503", "tried": count, "failures": bad,
            "notes": ", ".join(f"{v:,} {k}" for k, v in counts.items()) + f", {no_answer} closed unanswered, "
                     f"{errors} client errors; server log +{(server.log_bytes() - log_before) / 1e6:.2f} MB"}


def case_auth(server: Server, frame: bytes, count: int) -> list[dict]:
    rng = random.Random(1)
    bad_keys = [None, "", "Bearer", "Bearer ", f"Basic {KEY}", KEY, f"Bearer {KEY[:-1]}", f"Bearer {KEY}x",
                f"Bearer {KEY.upper()}", "Bearer " + "x" * len(KEY), f"Bearer {KEY} {KEY}", f"Token {KEY}"]
    routes = [("POST", "/v1/answer"), ("GET", "/v1/model"), ("GET", "/openapi.json"), ("GET", "/docs"),
              ("GET", "/nothing"), ("POST", "/v1/answer/")]
    requests = []
    for i in range(count):
        method, path = routes[i % len(routes)]
        requests.append(request_bytes(frame if method == "POST" else b"", method=method, path=path,
                                      headers={"Authorization": rng.choice(bad_keys)}))
    outcomes = asyncio.run(run_all((exchange(server.port, data) for data in requests), 32))
    good = asyncio.run(run_all((exchange(server.port, request_bytes(frame, headers={
        "Authorization": f"Bearer {KEY}"})) for _ in range(20)), 8))
    return [{"test": "requests without a valid API key answered", "tried": count,
             "failures": sum(o != 401 for o in outcomes),
             "notes": f"{sum(o == 401 for o in outcomes):,} got 401; with the key {good.count(200)}/20 answered 200"}]


def case_health(server: Server, frame: bytes, model: str) -> dict:
    checks = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        checks["healthy after warm-up"] = client.get("/healthz").status_code == 200
        failed = client.post("/v1/answer", content=frame, headers={"Content-Type": "application/octet-stream"})
        checks["500 on a failed batch"] = failed.status_code == 500
        checks["500 without exception text"] = not any(s in failed.text for s in ("CUDA", "/opt/", "RuntimeError"))
        health = client.get("/healthz")
        checks["/healthz 503 unhealthy after it"] = (health.status_code, health.json()["status"]) == (503, "unhealthy")
        checks["/v1/model without the model path"] = str(Path(model).resolve()) not in client.get("/v1/model").text
        checks["no /openapi.json"] = client.get("/openapi.json").status_code == 404
        checks["no /docs"] = client.get("/docs").status_code == 404
    failed_checks = [name for name, ok in checks.items() if not ok]
    return {"test": "honest health, no internals in answers", "tried": len(checks), "failures": len(failed_checks),
            "notes": "failed: " + ", ".join(failed_checks) if failed_checks else "model failing after warm-up"}


def case_gone_clients(server: Server, frame: bytes, count: int) -> dict:
    before = server.health()

    async def send_and_leave():
        _, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(request_bytes(frame))
        await writer.drain()
        writer.close()

    asyncio.run(run_all((send_and_leave() for _ in range(count)), count))
    time.sleep(2.0)
    after = server.health()
    computed = after["requests"] - before["requests"]
    return {"test": "requests whose client left at once, computed", "tried": count, "failures": computed,
            "notes": f"{after['abandoned'] - before['abandoned']} dropped before their batch, the rest refused "
                     f"with 503 (queue full)"}


def case_sigterm(server: Server, frame: bytes, count: int, shutdown_timeout: float) -> dict:
    async def run():
        async def one():
            try:
                return await exchange(server.port, request_bytes(frame), timeout=shutdown_timeout + 10)
            except OSError as exc:
                return exc

        tasks = [asyncio.ensure_future(one()) for _ in range(count)]
        deadline = time.monotonic() + 10
        async with httpx.AsyncClient(base_url=server.url, timeout=5) as client:
            while time.monotonic() < deadline:  # SIGTERM once the server holds every request
                health = (await client.get("/healthz")).json()
                if health["queue_depth"] + health["in_flight"] + health["requests"] - before >= count:
                    break
                await asyncio.sleep(0.005)
        in_flight = sum(not task.done() for task in tasks)
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        outcomes = await asyncio.gather(*tasks)
        return in_flight, outcomes, started

    before = server.health()["requests"]
    in_flight, outcomes, started = asyncio.run(run())
    try:
        server.process.wait(shutdown_timeout + 30)
    except subprocess.TimeoutExpired:
        pass
    exit_s = time.monotonic() - started
    answered, refused = outcomes.count(200), outcomes.count(503)
    return {"test": f"SIGTERM with {in_flight} requests in flight", "tried": count,
            "failures": count - answered - refused,
            "notes": f"{answered} answered, {refused} got 503, exit after {exit_s:.1f} s (code "
                     f"{server.process.returncode}), limit {shutdown_timeout:g} s"}


def costly_frames(model: str, frame: bytes) -> dict[str, bytes]:
    """Frames that cost the server work to refuse or to decode: a bad CRC (the cheap baseline), a 21-byte coded
    frame whose payload is empty, and a valid coded frame whose question is 2,048 escaped bytes (the longest
    --max-prompt-bytes allows)."""
    from transformers_alignedvq import wire
    from transformers_alignedvq.entropy import load_entropy_model

    entropy_model = load_entropy_model(model)
    decoded = wire.decode_frame(frame)
    prefix = wire._PREFIX.pack(wire.MAGIC, wire.FORMAT_VERSION, wire.PROMPT_CODED << wire.PROMPT_SHIFT,
                               wire.CODER_CONTEXT_MODEL, decoded.fingerprint)

    def framed(payload: bytes) -> bytes:
        body = prefix + entropy_model.model_id + payload
        return body + struct.pack("<I", zlib.crc32(body))

    question = "".join(chr(0x4E00 + i % 600) for i in range(2048 // 3))  # rare pieces: every byte escaped
    _, with_question = entropy_model.encode_payload(decoded.indices[:, 0], question)
    return {"a bad CRC": frame[:-1] + bytes([frame[-1] ^ 1]), "an empty coded payload (21 B)": framed(b""),
            f"a valid coded {len(question.encode())}-byte question ({len(framed(with_question)):,} B)":
            framed(with_question)}


def case_costly_frames(server: Server, frame: bytes, model: str, seconds: float, flooders: int = 4) -> list[dict]:
    """A valid client's latency while ``flooders`` threads send one kind of costly frame as fast as they can."""
    import threading

    def probe(stop: threading.Event) -> list[float]:
        latencies = []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                start = time.perf_counter()
                response = client.post("/v1/answer", content=frame, headers={"Content-Type": "application/octet-stream"})
                latencies.append(time.perf_counter() - start if response.status_code == 200 else float("inf"))
        return latencies

    def flood(body: bytes, stop: threading.Event, statuses: list) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            while not stop.is_set():
                statuses.append(client.post("/v1/answer", content=body,
                                            headers={"Content-Type": "application/octet-stream"}).status_code)

    rows = []
    for kind, body in {"no flood": None, **costly_frames(model, frame)}.items():
        stop, statuses, result = threading.Event(), [], []
        threads = [threading.Thread(target=flood, args=(body, stop, statuses)) for _ in range(flooders if body else 0)]
        threads.append(threading.Thread(target=lambda: result.extend(probe(stop))))
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join()
        finite = sorted(x for x in result if x != float("inf"))
        p50, p99 = (1000 * finite[int(q * (len(finite) - 1))] for q in (0.5, 0.99)) if finite else (0, 0)
        flood_note = (f"; {len(statuses):,} flood requests, statuses {sorted(set(statuses))}" if body else "")
        rows.append({"test": f"valid requests during a flood of {kind} ({flooders} threads)" if body else
                     "valid requests, no flood (baseline)", "tried": len(result),
                     "failures": len(result) - len(finite), "notes": f"p50 {p50:.0f} ms, p99 {p99:.0f} ms{flood_note}"})
    return rows


# ---------------------------------------------------------------------------------------------------------
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model folder (default: the bundled easy-VQA model)")
    parser.add_argument("--idle", type=int, default=20_000, help="idle connections (split over 4 processes)")
    parser.add_argument("--slow", type=int, default=200, help="slow clients (half slow heads, half slow bodies)")
    parser.add_argument("--hold", type=float, default=30.0, help="seconds the idle/slow case lasts")
    parser.add_argument("--fuzz", type=int, default=20_000, help="fuzzed requests")
    parser.add_argument("--auth", type=int, default=2_000, help="requests without a valid key")
    parser.add_argument("--gone", type=int, default=200, help="clients that leave after sending their request")
    parser.add_argument("--in-flight", type=int, default=64, help="requests in flight at SIGTERM")
    parser.add_argument("--costly-seconds", type=float, default=10.0, help="seconds each costly-frame flood lasts")
    parser.add_argument("--cases", default="idle,fuzz,gone,auth,health,sigterm,costly", help="cases to run")
    args = parser.parse_args()
    cases = set(args.cases.split(","))
    from transformers_alignedvq import TINY_EASYVQA
    from transformers_alignedvq.export.edge_export import describe_checkpoint
    from transformers_alignedvq.serving.connection_limits import ConnectionLimits

    defaults = ConnectionLimits()
    args.header_timeout, args.body_timeout = defaults.header_timeout, defaults.body_timeout
    model = args.model or str(TINY_EASYVQA)
    frame = make_frames(describe_checkpoint(model), 1)[0]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "keys").write_text(KEY + "\n")
        servers = {"main": Server("main", model, scratch)}
        if "auth" in cases:
            servers["auth"] = Server("auth", model, scratch, ["--api-keys-file", str(scratch / "keys")])
        if "health" in cases:
            servers["failing"] = Server("failing", model, scratch, launcher=FAILING_SERVER)
        if "sigterm" in cases:  # one request per batch keeps them in flight long enough to signal while they are
            servers["sigterm"] = Server("sigterm", model, scratch, ["--max-batch-size", "1"])
        try:
            for server in servers.values():
                server.ready()
            started = time.monotonic()
            main_server = servers["main"]
            if "idle" in cases:
                rows += case_idle_and_slow(main_server, frame, args)
            if "fuzz" in cases:
                rows.append(case_fuzz(main_server, frame, args.fuzz))
            if "gone" in cases:
                rows.append(case_gone_clients(main_server, frame, args.gone))
            if "costly" in cases:
                rows += case_costly_frames(main_server, frame, model, args.costly_seconds)
            if "auth" in cases:
                rows += case_auth(servers["auth"], frame, args.auth)
            if "health" in cases:
                rows.append(case_health(servers["failing"], frame, model))
            if "sigterm" in cases:
                rows.append(case_sigterm(servers["sigterm"], frame, args.in_flight, defaults.shutdown_timeout))
            elapsed = time.monotonic() - started
        finally:
            for server in servers.values():
                server.stop()
    print(f"\n`alignedvq serve` with default limits on 127.0.0.1, {Path(model).name}, {elapsed:.0f} s of cases")
    print("| test | tried | failures | measured |")
    print("|---|---:|---:|---|")
    for row in rows:
        print(f"| {row['test']} | {row['tried']:,} | {row['failures']:,} | {row['notes']} |")
    return 1 if any(row["failures"] for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
