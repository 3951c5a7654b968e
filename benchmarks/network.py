"""End-to-end latency over a real, shaped network link: AlignedVQ frames vs JPEG uploads (paper, Figure 6).

The edge and the cloud live in two network namespaces joined by a veth pair this script creates
(edge 10.231.0.1/30, cloud 10.231.0.2/30 by default; traffic only ever goes to the cloud end of that link).
Both ends are shaped with ``tc qdisc ... tbf`` (or ``netem rate``, see below) at each bandwidth in turn
(0.25, 0.5, 1, 2, 4 Mbit/s by default). For every bandwidth and method the edge namespace uploads the
payload to a tiny HTTP sink in the cloud namespace over a fresh TCP connection and waits for its reply;
that wall time (handshake, request, response) is the transfer time. The edge veth's byte counters give
the bytes on the wire in each direction (Ethernet, IP and TCP headers, handshake and teardown included).

Compute times are measured once, up front, on this host, with the LLaVA-1.5 vision tower (CLIP
ViT-L/14-336, random weights, K = 4096, split after the first LayerNorm of block 0):

* AlignedVQ: edge = preprocessing + embeddings + split site + quantization + framing;
  cloud vision = frame decoding + codebook lookup + output DLP + the rest of the tower + projector.
* JPEG-q: edge = JPEG encoding of the 336x336 image; cloud vision = JPEG decoding + preprocessing +
  the whole tower (to hidden state -2, as LLaVA-1.5 reads it) + projector.

The language model's time is the same for every method and left out. Images: natural photos from
``skimage.data`` resized to 336x336. Prints a table and saves a stacked-bar plot (edge / transfer / cloud
per bandwidth and method).

Shaping: a token bucket (tbf) lets up to one MTU-sized packet through at line speed after the link was
idle, so a transfer that fits one packet (an AlignedVQ frame does) pays only the round trip, while bigger
uploads are paced at the rate. The table therefore also shows ``wire/rate``, the uplink bytes on the wire
divided by the rate: what a physical link of that speed needs to clock them out. ``--shaper netem`` (where
the kernel has ``sch_netem``) delays every packet by its serialization time instead, like such a link.

Needs root, ``ip`` and ``tc``; otherwise it prints why and exits 0. The namespaces (and with them the veth
pair) are removed on exit, also on errors and Ctrl-C.

    sudo python benchmarks/network.py [--bandwidths 0.25,0.5,1,2,4] [--repeats 3] [--plot network.png]
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
    """Median ms per image of each method's edge part (CPU) and cloud-vision part (``cloud_device``), and one
    real AlignedVQ frame. The heavy cloud passes are interleaved so machine noise hits both methods alike."""
    import copy

    import torch
    from PIL import Image
    from torch import nn
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    from transformers_alignedvq import split, wire
    from transformers_alignedvq.alignedvq_layer import AlignedVQLayer

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
    tower = CLIPVisionModel(vision).eval()
    layer = AlignedVQLayer(1024, 4096).eval()
    with torch.no_grad():  # trained DLPs have non-zero gates
        layer.dlp_in.gate.fill_(0.1)
        layer.dlp_out.gate.fill_(0.1)
    projector = nn.Sequential(nn.Linear(1024, 4096), nn.GELU(), nn.Linear(4096, 4096)).eval()
    device = torch.device(cloud_device)
    if device.type == "cpu":
        cloud_tower, cloud_layer, cloud_projector = tower, layer, projector
    else:
        cloud_tower, cloud_layer, cloud_projector = (copy.deepcopy(m).to(device) for m in (tower, layer, projector))
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    fingerprint = wire.codebook_fingerprint(layer.quantizer.codebook)
    last = vision.num_hidden_layers - 1  # hidden state -2, what LLaVA-1.5 reads

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def pixels(image):
        return processor(images=image, return_tensors="pt")["pixel_values"]

    @torch.no_grad()
    def avq_edge(image):
        indices = layer.encode(split.edge_forward(tower, pixels(image), 0, "ln1"))[0, :, 0]
        return wire.encode_frame(indices.numpy(), codebook_size=4096, codebook_fingerprint=fingerprint,
                                 grid=(24, 24), has_cls_token=True, prompt=QUESTION)

    @torch.no_grad()
    def avq_cloud(frame):
        decoded = wire.decode_frame(frame, codebook_size=4096, codebook_fingerprint=fingerprint, num_tokens=577)
        z = cloud_layer.decode(torch.from_numpy(decoded.indices.copy())[None].to(device))
        hidden = split.cloud_forward(cloud_tower, z, 0, "ln1", [last])[last]
        cloud_projector(hidden[:, 1:])
        sync()

    def jpeg_decode(data):
        return pixels(Image.open(io.BytesIO(data)).convert("RGB"))

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
    first_pixels = pixels(images[0])
    avq_cloud(frame), full_tower(first_pixels)  # warm-up
    edge_ms, avq_ms, tower_ms = [], [], []
    for r in range(repeats):
        image = images[r % len(images)]
        edge_ms.append(timed(avq_edge, image))
        avq_ms.append(timed(avq_cloud, frame))
        tower_ms.append(timed(full_tower, pixels(image)))
    compute = {"AlignedVQ": {"edge": statistics.median(edge_ms), "cloud": statistics.median(avq_ms)}}
    for quality in qualities:
        encode_ms = [timed(lambda im: jpeg_bytes(im, quality), im) for im in images * 3]
        decode_ms = [timed(jpeg_decode, jpeg_bytes(im, quality)) for im in images * 3]
        compute[f"JPEG-{quality}"] = {"edge": statistics.median(encode_ms),
                                      "cloud": statistics.median(decode_ms) + statistics.median(tower_ms)}
    compute["_host"] = {"edge": f"cpu, {torch.get_num_threads()} thread(s)",
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
    colors = {"edge": "#4C72B0", "transfer": "#DD8452", "cloud": "#55A868"}
    hatches = ["", "//", ".."]
    fig, ax = plt.subplots(figsize=(10.5, 4.8))
    for m, method in enumerate(methods):
        for b, mbit in enumerate(bandwidths):
            cell = results[(mbit, method)]
            bottom = 0.0
            for part in ("edge", "transfer", "cloud"):
                value = cell[part] / 1000
                ax.bar(b + (m - (len(methods) - 1) / 2) * width, value, width * 0.95, bottom=bottom,
                       color=colors[part], hatch=hatches[m % len(hatches)], edgecolor="black", linewidth=0.5)
                bottom += value
    ax.set_xticks(range(len(bandwidths)), [f"{b:g} Mbit/s" for b in bandwidths])
    ax.set_ylabel("end-to-end latency (s), language model excluded")
    ax.set_title("AlignedVQ indices vs JPEG uploads over a shaped link")
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, edgecolor="black", label=p) for p, c in colors.items()]
    handles += [Patch(facecolor="white", edgecolor="black", hatch=hatches[m % len(hatches)], label=method)
                for m, method in enumerate(methods)]
    ax.legend(handles=handles, fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bandwidths", default="0.25,0.5,1,2,4", help="Mbit/s, comma-separated")
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
        results[(mbit, method)]["total"] = sum(results[(mbit, method)][k] for k in ("edge", "transfer", "cloud"))

    host = compute.get("_host", {})
    print(f"\ncompute per image (ms, median; edge on {host.get('edge', '?')}, cloud on {host.get('cloud', '?')}): "
          + ", ".join(f"{m} edge {compute[m]['edge']:.1f} / cloud vision {compute[m]['cloud']:.1f}" for m in methods))
    print(f"shaper: {args.shaper}; transfer = fresh TCP connection + HTTP upload + reply, median of {args.repeats}"
          + ("; tbf passes one packet unpaced after idle, so one-packet uploads pay only the round trip"
             if args.shaper == "tbf" else ""))
    print("wire/rate = the uplink's bytes on the wire clocked out at the rate (what a physical link of that speed "
          "needs)")
    header = (f"{'Mbit/s':>6} {'method':<10} {'payload B':>9} {'wire up B':>9} {'wire down B':>11} "
              f"{'wire/rate ms':>12} {'edge ms':>8} {'transfer ms':>11} {'cloud ms':>9} {'total ms':>9} "
              f"{'vs JPEG-90':>10}")
    print(header)
    print("-" * len(header))
    for mbit in bandwidths:
        reference = results.get((mbit, "JPEG-90"))
        for method in methods:
            r = results[(mbit, method)]
            speedup = f"{reference['total'] / r['total']:.2f}x" if reference else "-"
            print(f"{mbit:>6g} {method:<10} {r['payload']:>9.0f} {r['up']:>9.0f} {r['down']:>11.0f} "
                  f"{r['up'] * 8 / (mbit * 1000):>12.1f} {r['edge']:>8.1f} "
                  f"{r['transfer']:>11.1f} {r['cloud']:>9.1f} {r['total']:>9.1f} {speedup:>10}")
    plot(results, bandwidths, methods, args.plot)
    print(f"plot saved to {args.plot}")
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
