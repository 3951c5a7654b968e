"""End-to-end latency over a real, shaped network link: AlignedVQ frames vs JPEG uploads (paper, Figure 6).

The edge and the cloud live in two network namespaces joined by a veth pair this script creates
(edge 10.231.0.1/30, cloud 10.231.0.2/30 by default; traffic only ever goes to the cloud end of that link).
Both ends are shaped with ``tc qdisc ... tbf`` (or ``netem rate``, see below) at each bandwidth in turn
(0.25, 0.5, 1, 2, 4 Mbit/s by default). For every bandwidth and method the edge namespace uploads the
payload to a tiny HTTP sink in the cloud namespace over a fresh TCP connection and waits for its reply;
that wall time (handshake, request, response) is the transfer time. The edge veth's byte counters give
the bytes on the wire in each direction (Ethernet, IP and TCP headers, handshake and teardown included).

Compute times are measured once, up front, on this host, with the LLaVA-1.5 vision tower (CLIP
ViT-L/14-336, random weights, K = 4096 from k-means on photo features, split at the input of block 0):

* AlignedVQ: edge = preprocessing + the ONNX edge (int8 front, shortlist search; `benchmarks/edge_encode.py`)
  on one core + framing; cloud vision = frame decoding + codebook lookup + output DLP + the whole tower +
  projector.
* JPEG-q: edge = JPEG encoding of the 336x336 image (one core); cloud vision = JPEG decoding + preprocessing +
  the whole tower (to hidden state -2, as LLaVA-1.5 reads it) + projector.

The language model's time is the same for every method and left out, and the cloud's vision time is nearly
the same for every method too (the whole tower runs in the cloud either way): on a CPU it hides everything else,
on a GPU it is a few milliseconds. So the table reports ``edge + transfer``, what differs between methods,
beside the cloud's time, and compares methods on it. Images: natural photos from
``skimage.data`` resized to 336x336. Prints a table and saves a stacked-bar plot (edge / transfer / cloud
per bandwidth and method).

Shaping: a token bucket (tbf) lets up to one MTU-sized packet through at line speed after the link was
idle, so a transfer that fits one packet (an AlignedVQ frame does) would pay only the round trip, while bigger
uploads are paced at the rate. The table therefore also shows ``wire/rate``, the bytes on the wire in both
directions (handshake, request, reply, teardown) divided by the rate: what a physical link of that speed needs
to clock them out; the comparison uses ``max(measured, wire/rate)`` for every method, so no method gains from
tbf's free first packet. ``--shaper netem`` (where the kernel has ``sch_netem``) delays every packet by its
serialization time instead, like such a link.

Needs root, ``ip`` and ``tc``; otherwise it prints why and exits 0. The namespaces (and with them the veth
pair) are removed on exit, also on errors and Ctrl-C.

    sudo python benchmarks/network.py [--bandwidths 0.25,0.5,1,2,4,8] [--repeats 3] [--plot network.png]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

EDGE_ADDRESS, CLOUD_ADDRESS, PREFIX = "10.231.0.1", "10.231.0.2", 30
SINK_PORT = 9000
QUESTION = "What is shown in this image?"
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field")


# ---------------------------------------------------------------------------------------------------------
# roles run inside the namespaces (re-invocations of this script; no torch, fast to start)
# ---------------------------------------------------------------------------------------------------------
def _read_http_request(conn: socket.socket) -> int:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return -1
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    received = len(body)
    while received < length:
        chunk = conn.recv(65536)
        if not chunk:
            return -1
        received += len(chunk)
    return received


def role_sink(bind: str, port: int) -> None:
    """Receive one HTTP upload per connection, answer a short JSON, close. Runs until killed."""
    with socket.create_server((bind, port), backlog=16) as server:
        print("ready", flush=True)
        while True:
            conn, _ = server.accept()
            with conn:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                received = _read_http_request(conn)
                body = json.dumps({"received": received}).encode()
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def _counters(interface: str) -> tuple[int, int]:
    base = Path("/sys/class/net") / interface / "statistics"
    return int((base / "tx_bytes").read_text()), int((base / "rx_bytes").read_text())


def role_send(host: str, port: int, interface: str, plan_path: str, settle: float) -> None:
    """Upload each planned payload, print one JSON line per transfer (seconds, payload and wire bytes)."""
    plan = json.loads(Path(plan_path).read_text())
    for item in plan:
        payload = Path(item["path"]).read_bytes()
        request = (f"POST /upload HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload
        tx0, rx0 = _counters(interface)
        start = time.perf_counter()
        with socket.create_connection((host, port), timeout=120) as conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.sendall(request)
            response = b""
            while chunk := conn.recv(65536):
                response += chunk
        seconds = time.perf_counter() - start
        if not response.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"sink answered {response[:80]!r}")
        time.sleep(settle)  # let the FIN/ACK exchange finish (counted) and the token bucket refill
        tx1, rx1 = _counters(interface)
        print(json.dumps({"method": item["method"], "seconds": seconds, "payload": len(payload),
                          "up": tx1 - tx0, "down": rx1 - rx0}), flush=True)


# ---------------------------------------------------------------------------------------------------------
# compute times
# ---------------------------------------------------------------------------------------------------------
def load_photos(count: int):
    from PIL import Image
    from skimage import data

    photos = []
    for name in PHOTOS[:count]:
        image = Image.fromarray(getattr(data, name)()).convert("RGB")
        # Shortest side to 336, then the central square: what CLIP's preprocessing keeps anyway.
        scale = 336 / min(image.size)
        image = image.resize((max(336, round(image.width * scale)), max(336, round(image.height * scale))),
                             Image.Resampling.BICUBIC)
        left, top = (image.width - 336) // 2, (image.height - 336) // 2
        photos.append((name, image.crop((left, top, left + 336, top + 336))))
    return photos


def jpeg_bytes(image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def with_question(image_bytes: bytes) -> bytes:
    """The JPEG baselines also send the question: u32 length + UTF-8 + the image bytes."""
    question = QUESTION.encode()
    return len(question).to_bytes(4, "little") + question + image_bytes


def measure_compute(photos, qualities, repeats: int, threads: int | None, cloud_device: str) -> tuple[dict, bytes]:
    """Median ms per image of each method's edge part (one CPU core) and cloud-vision part (``cloud_device``),
    and one real AlignedVQ frame. The heavy cloud passes are interleaved so machine noise hits both alike."""
    import copy

    import numpy as np
    import torch
    from PIL import Image
    from torch import nn

    from transformers_alignedvq import split, wire
    from transformers_alignedvq.edge_runtime import load_edge_runtime
    from transformers_alignedvq.export.edge_export import export_onnx_folder
    from transformers_alignedvq.export.search import SearchConfig
    from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayer
    from transformers_alignedvq.preprocess import ImagePreprocessing

    sys.path.insert(0, str(Path(__file__).parent))
    import edge_encode

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    vision, tower = edge_encode.llava_tower()
    prep = ImagePreprocessing.for_vision_config("clip_vision_model", 336)
    fit = torch.from_numpy(np.concatenate([prep(c) for c in edge_encode.photo_crops(edge_encode.FIT_PHOTOS, 8, 0)]))
    edge = edge_encode.build_edge(vision, tower, 0, "input", fit, kmeans_iters=10)
    edge.refresh_search(SearchConfig("shortlist", rank=32, candidates=8))
    calibration = edge_encode.photo_crops(edge_encode.FIT_PHOTOS, 4, seed=2)
    with tempfile.TemporaryDirectory() as scratch:
        runtime = load_edge_runtime(export_onnx_folder(edge, scratch, int8=True, calibration_images=calibration),
                                    threads=1)
    layer = AlignedVQLayer(1024, 4096).eval()  # the cloud's half: the edge's codebook, an output DLP
    with torch.no_grad():
        layer.quantizer.codebook.copy_(edge.alignedvq.quantizer.codebook)
        layer.dlp_out.gate.fill_(0.1)
    projector = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096)).eval()
    device = torch.device(cloud_device)
    if device.type == "cpu":
        cloud_tower, cloud_layer, cloud_projector = tower, layer, projector
    else:
        cloud_tower, cloud_layer, cloud_projector = (copy.deepcopy(m).to(device) for m in (tower, layer, projector))
    last = vision.num_hidden_layers - 1  # hidden state -2, what LLaVA-1.5 reads

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def avq_edge(image):
        indices = runtime.encode_image(image)
        return wire.encode_frame(indices, codebook_size=4096, codebook_fingerprint=runtime.fingerprint,
                                 grid=(24, 24), has_cls_token=True, prompt=QUESTION)

    @torch.no_grad()
    def avq_cloud(frame):
        decoded = wire.decode_frame(frame, codebook_size=4096, codebook_fingerprint=runtime.fingerprint,
                                    num_tokens=577)
        z = cloud_layer.decode(torch.from_numpy(decoded.indices.copy())[None].to(device))
        hidden = split.cloud_forward(cloud_tower, z, 0, "input", [last])[last]
        cloud_projector(hidden[:, 1:])
        sync()

    def jpeg_decode(data):
        return torch.from_numpy(prep(Image.open(io.BytesIO(data))))

    @torch.no_grad()
    def full_tower(pixel_values):
        hidden = split.embed(cloud_tower, pixel_values.to(device))
        for block in split.vision_blocks(cloud_tower)[:last]:
            hidden = block(hidden, None)
        cloud_projector(hidden[:, 1:])
        sync()

    def timed(fn, arg) -> float:
        start = time.perf_counter()
        fn(arg)
        return 1000 * (time.perf_counter() - start)

    images = [image for _, image in photos]
    frame = avq_edge(images[0])
    avq_cloud(frame), full_tower(torch.from_numpy(prep(images[0])))  # warm-up
    edge_ms = [timed(avq_edge, image) for image in images * 5]
    avq_ms, tower_ms = [], []
    for r in range(repeats):
        avq_ms.append(timed(avq_cloud, frame))
        tower_ms.append(timed(full_tower, torch.from_numpy(prep(images[r % len(images)]))))
    compute = {"AlignedVQ": {"edge": statistics.median(edge_ms), "cloud": statistics.median(avq_ms)}}
    for quality in qualities:
        encode_ms = [timed(lambda im: jpeg_bytes(im, quality), im) for im in images * 3]
        decode_ms = [timed(jpeg_decode, jpeg_bytes(im, quality)) for im in images * 3]
        compute[f"JPEG-{quality}"] = {"edge": statistics.median(encode_ms),
                                      "cloud": statistics.median(decode_ms) + statistics.median(tower_ms)}
    compute["_host"] = {"edge": "cpu, 1 thread (onnxruntime int8 edge; Pillow JPEG)",
                        "cloud": torch.cuda.get_device_name(device) if device.type == "cuda" else
                        f"cpu, {torch.get_num_threads()} thread(s)"}
    return compute, frame


# ---------------------------------------------------------------------------------------------------------
# namespaces and shaping
# ---------------------------------------------------------------------------------------------------------
def run(*command: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command, check=check, capture_output=True, text=True)


class Link:
    """Two namespaces joined by a veth pair; removed by `close` (deleting a namespace deletes its veth end)."""

    def __init__(self, edge_address: str, cloud_address: str):
        tag = os.getpid() % 100_000
        self.edge_ns, self.cloud_ns = f"avq-edge-{tag}", f"avq-cloud-{tag}"
        self.edge_if, self.cloud_if = f"avqe{tag}", f"avqc{tag}"
        self.edge_address, self.cloud_address = edge_address, cloud_address
        self.created: list[str] = []

    def open(self) -> None:
        for ns in (self.edge_ns, self.cloud_ns):
            run("ip", "netns", "add", ns)
            self.created.append(ns)
        run("ip", "link", "add", self.edge_if, "netns", self.edge_ns, "type", "veth",
            "peer", "name", self.cloud_if, "netns", self.cloud_ns)
        for ns, interface, address in ((self.edge_ns, self.edge_if, self.edge_address),
                                       (self.cloud_ns, self.cloud_if, self.cloud_address)):
            run("ip", "-n", ns, "addr", "add", f"{address}/{PREFIX}", "dev", interface)
            run("ip", "-n", ns, "link", "set", interface, "up")
            run("ip", "-n", ns, "link", "set", "lo", "up")
            if shutil.which("ethtool"):
                # Keep the results about the link, not about offloads batching segments into 64 KB packets
                # that the shaper then has to pass whole.
                run("ip", "netns", "exec", ns, "ethtool", "-K", interface, "tso", "off", "gso", "off", "gro",
                    "off", check=False)

    def shape(self, mbit: float, shaper: str) -> None:
        rate = f"{mbit * 1000:.0f}kbit"
        for ns, interface in ((self.edge_ns, self.edge_if), (self.cloud_ns, self.cloud_if)):
            if shaper == "tbf":
                # The smallest bucket that passes a full-size frame, and a queue deep enough that TCP's
                # initial window is delayed rather than dropped.
                spec = ["tbf", "rate", rate, "burst", "1600", "limit", "262144"]
            else:
                spec = ["netem", "rate", rate, "limit", "10000"]
            try:
                run("ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", interface, "root", *spec)
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(f"tc cannot set up {spec[0]} on this kernel (is sch_{spec[0]} available?): "
                                   f"{exc.stderr.strip()}") from exc

    def close(self) -> None:
        for ns in reversed(self.created):
            run("ip", "netns", "del", ns, check=False)
        self.created.clear()


def _interrupt(signum, frame):
    # A SIGTERM unwinds like Ctrl-C, so the `finally` that removes the namespaces runs.
    raise KeyboardInterrupt


def skip_reason() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "needs root (network namespaces, veth and tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"{' and '.join(missing)} not found (install iproute2)"
    return None


# ---------------------------------------------------------------------------------------------------------
def plot(results: dict, bandwidths: list[float], methods: list[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / len(methods)
    colors = {"edge": "#4C72B0", "paced": "#DD8452"}
    hatches = ["", "//", ".."]
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for m, method in enumerate(methods):
        for b, mbit in enumerate(bandwidths):
            cell = results[(mbit, method)]
            bottom = 0.0
            for part in ("edge", "paced"):
                value = cell[part] / 1000
                ax.bar(b + (m - (len(methods) - 1) / 2) * width, value, width * 0.95, bottom=bottom,
                       color=colors[part], hatch=hatches[m % len(hatches)], edgecolor="black", linewidth=0.5)
                bottom += value
    ax.set_xticks(range(len(bandwidths)), [f"{b:g} Mbit/s" for b in bandwidths])
    ax.set_ylabel("edge + transfer (s): what differs between methods")
    ax.set_title("AlignedVQ indices vs JPEG uploads over a shaped link")
    from matplotlib.patches import Patch

    labels = {"edge": "edge", "paced": "transfer (paced)"}
    handles = [Patch(facecolor=c, edgecolor="black", label=labels[p]) for p, c in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=hatches[m % len(hatches)], label=method)
                for m, method in enumerate(methods)]
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def markdown_table(results: dict, bandwidths: list[float], methods: list[str], compute: dict, shaper: str) -> str:
    host = compute.get("_host", {})
    lines = [f"Edge on {host.get('edge', '?')}; cloud vision on {host.get('cloud', '?')}; shaper {shaper}; "
             "transfer = max(measured, wire bytes / rate).", "",
             "| Mbit/s | method | payload (B) | edge (ms) | transfer (ms) | edge + transfer (ms) | vs JPEG-90 | "
             "vs JPEG-10 | cloud vision (ms) |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mbit in bandwidths:
        for method in methods:
            r = results[(mbit, method)]
            ratios = [f"{results[(mbit, ref)]['edge_transfer'] / r['edge_transfer']:.2f}x"
                      if (mbit, ref) in results else "-" for ref in ("JPEG-90", "JPEG-10")]
            lines.append(f"| {mbit:g} | {method} | {r['payload']:.0f} | {r['edge']:.1f} | {r['paced']:.1f} | "
                         f"{r['edge_transfer']:.1f} | {ratios[0]} | {ratios[1]} | {r['cloud']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default="0.25,0.5,1,2,4,8", help="Mbit/s, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="transfers per bandwidth and method")
    parser.add_argument("--images", type=int, default=4, help=f"photos used, at most {len(PHOTOS)}")
    parser.add_argument("--qualities", default="90,10", help="JPEG qualities of the baselines")
    parser.add_argument("--compute-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the compute timing")
    parser.add_argument("--cloud-device", default=None, help="device for the cloud-vision timing (default: cuda if "
                        "available, else cpu); the edge part is always timed on the CPU")
    parser.add_argument("--compute-times", help="--json file of an earlier run: reuse its compute times")
    parser.add_argument("--compute-only", action="store_true",
                        help="only measure compute and write it to --json (no network part, no root needed)")
    parser.add_argument("--shaper", choices=("tbf", "netem"), default="tbf")
    parser.add_argument("--edge-address", default=EDGE_ADDRESS)
    parser.add_argument("--cloud-address", default=CLOUD_ADDRESS)
    parser.add_argument("--plot", default="network_latency.png", help="where to save the figure")
    parser.add_argument("--json", help="also write all results to this JSON file")
    parser.add_argument("--markdown", help="also write the comparison as a Markdown table to this file")
    # Internal: the roles this script plays inside the namespaces.
    parser.add_argument("--role", choices=("sink", "send"), help=argparse.SUPPRESS)
    parser.add_argument("--host", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=SINK_PORT, help=argparse.SUPPRESS)
    parser.add_argument("--interface", help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--settle", type=float, default=0.2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "sink":
        role_sink(args.host, args.port)
        return 0
    if args.role == "send":
        role_send(args.host, args.port, args.interface, args.plan, args.settle)
        return 0

    reason = None if args.compute_only else skip_reason()
    if reason:
        print(f"SKIP network benchmark: {reason}.")
        return 0
    if args.compute_only and not args.json:
        parser.error("--compute-only needs --json FILE")
    bandwidths = [float(b) for b in args.bandwidths.split(",")]
    qualities = [int(q) for q in args.qualities.split(",")]
    methods = ["AlignedVQ"] + [f"JPEG-{q}" for q in qualities]
    photos = load_photos(max(1, min(args.images, len(PHOTOS))))

    if args.compute_times:
        saved = json.loads(Path(args.compute_times).read_text())
        compute, frame = saved["compute"], bytes.fromhex(saved["frame_hex"])
        missing = [m for m in methods if m not in compute]
        if missing:
            parser.error(f"{args.compute_times} has no compute times for {missing}")
    else:
        import torch

        cloud_device = args.cloud_device or ("cuda" if torch.cuda.is_available() else "cpu")
        print(f"measuring compute (CLIP ViT-L/14-336, random weights, {args.compute_repeats} repeats, "
              f"cloud on {cloud_device}) ...", flush=True)
        compute, frame = measure_compute(photos, qualities, args.compute_repeats, args.threads, cloud_device)
    if args.compute_only:
        Path(args.json).write_text(json.dumps({"compute": compute, "frame_hex": frame.hex()}, indent=2))
        print(json.dumps(compute, indent=2))
        return 0
    payloads = {"AlignedVQ": [frame]}
    for quality in qualities:
        payloads[f"JPEG-{quality}"] = [with_question(jpeg_bytes(image, quality)) for _, image in photos]

    signal.signal(signal.SIGTERM, _interrupt)
    link = Link(args.edge_address, args.cloud_address)
    sink = None
    transfers: dict[tuple[float, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        plan = []
        for method, items in payloads.items():
            for r in range(args.repeats):
                path = Path(scratch) / f"{method}-{r % len(items)}.bin"
                path.write_bytes(items[r % len(items)])
                plan.append({"method": method, "path": str(path)})
        plan_path = Path(scratch) / "plan.json"
        plan_path.write_text(json.dumps(plan))
        me = [sys.executable, os.path.abspath(__file__)]
        try:
            try:
                link.open()
            except subprocess.CalledProcessError as exc:
                print(f"SKIP network benchmark: cannot create the namespaces/veth ({exc.stderr.strip() or exc}).")
                return 0
            sink = subprocess.Popen(
                ["ip", "netns", "exec", link.cloud_ns, *me, "--role", "sink", "--host", link.cloud_address,
                 "--port", str(args.port)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            if sink.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the sink did not start: {sink.stderr.read()[-2000:]}")
            for mbit in bandwidths:
                link.shape(mbit, args.shaper)
                print(f"{mbit:g} Mbit/s ({args.shaper}) ...", flush=True)
                done = subprocess.run(
                    ["ip", "netns", "exec", link.edge_ns, *me, "--role", "send", "--host", link.cloud_address,
                     "--port", str(args.port), "--interface", link.edge_if, "--plan", str(plan_path),
                     "--settle", str(args.settle)],
                    capture_output=True, text=True, timeout=600, check=False)
                if done.returncode != 0:
                    raise RuntimeError(f"transfer at {mbit} Mbit/s failed: {done.stderr[-2000:]}")
                for line in done.stdout.splitlines():
                    record = json.loads(line)
                    transfers.setdefault((mbit, record["method"]), []).append(record)
        finally:
            if sink is not None:
                sink.kill()
                sink.wait()
            link.close()

    results = {}
    for (mbit, method), records in transfers.items():
        results[(mbit, method)] = {
            "edge": compute[method]["edge"],
            "transfer": 1000 * statistics.median(r["seconds"] for r in records),
            "cloud": compute[method]["cloud"],
            "payload": statistics.median(r["payload"] for r in records),
            "up": statistics.median(r["up"] for r in records),
            "down": statistics.median(r["down"] for r in records),
        }
        cell = results[(mbit, method)]
        cell["wire_ms"] = (cell["up"] + cell["down"]) * 8 / (mbit * 1000)
        cell["paced"] = max(cell["transfer"], cell["wire_ms"])
        cell["edge_transfer"] = cell["edge"] + cell["paced"]
        cell["total"] = cell["edge_transfer"] + cell["cloud"]

    host = compute.get("_host", {})
    print(f"\ncompute per image (ms, median; edge on {host.get('edge', '?')}, cloud on {host.get('cloud', '?')}): "
          + ", ".join(f"{m} edge {compute[m]['edge']:.1f} / cloud vision {compute[m]['cloud']:.1f}" for m in methods))
    print(f"shaper: {args.shaper}; transfer = fresh TCP connection + HTTP upload + reply, median of {args.repeats}"
          + ("; tbf passes one packet unpaced after idle, so one-packet uploads pay only the round trip"
             if args.shaper == "tbf" else ""))
    print("wire/rate = the bytes on the wire (both directions) clocked out at the rate; paced = max(measured, "
          "wire/rate); edge+xfer = edge + paced transfer, what differs between methods")
    header = (f"{'Mbit/s':>6} {'method':<10} {'payload B':>9} {'wire B':>7} {'wire/rate':>9} {'measured':>8} "
              f"{'edge':>6} {'edge+xfer':>9} {'vs JPEG-90':>10} {'vs JPEG-10':>10} {'cloud':>8}")
    print(header + "   (ms)")
    print("-" * len(header))
    for mbit in bandwidths:
        for method in methods:
            r = results[(mbit, method)]
            ratios = []
            for ref in ("JPEG-90", "JPEG-10"):
                other = results.get((mbit, ref))
                ratios.append(f"{other['edge_transfer'] / r['edge_transfer']:.2f}x" if other else "-")
            print(f"{mbit:>6g} {method:<10} {r['payload']:>9.0f} {r['up'] + r['down']:>7.0f} {r['wire_ms']:>9.1f} "
                  f"{r['transfer']:>8.1f} {r['edge']:>6.1f} {r['edge_transfer']:>9.1f} {ratios[0]:>10} "
                  f"{ratios[1]:>10} {r['cloud']:>8.0f}")
    plot(results, bandwidths, methods, args.plot)
    print(f"plot saved to {args.plot}")
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results, bandwidths, methods, compute, args.shaper))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "compute": compute, "frame_hex": frame.hex(), "shaper": args.shaper,
            "results": [{"mbit": m, "method": k, **v} for (m, k), v in results.items()],
        }, indent=2))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except RuntimeError as exc:  # setup or transfer failures: the namespaces are already removed
        print(f"network benchmark failed: {exc}", file=sys.stderr)
        sys.exit(1)
