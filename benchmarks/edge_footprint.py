"""What the edge process costs before and after the ONNX path: import time, resident memory, time per image.

Each configuration runs in a fresh interpreter, one thread, three times (medians):

* ``PyTorch edge``: `EdgeClient` on an edge folder with ``edge_model.safetensors`` (PyTorch + Transformers);
* ``ONNX edge``: `EdgeClient` on the same edge exported with ``alignedvq export-edge --format onnx``, in a process
  where importing torch or transformers fails, as on a device with only ``transformers-alignedvq[edge]``.

Reported: seconds to import the client module, seconds to load the edge folder, peak resident memory (MB)
after encoding one image, and milliseconds per image (pixels -> frame, median of 20) for the bundled model.

A second table is the ``alignedvq ask`` process itself, in this environment where torch and transformers are
installed: seconds to import the CLI and the client, seconds for the whole command (edge folder loaded, one
image encoded, a refused connection to a closed port, no retries), peak resident memory, and whether torch or
transformers were loaded. ``torch blocked`` is the same command as on a device without them; ``cloud import``
is what importing the model class costs, for scale. Run it on an older checkout (``PYTHONPATH=OLD/src``) to
compare before and after a change.

    python benchmarks/edge_footprint.py [--model MODEL_DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

# Both probes: argv[2] == "block" runs argv[3] first (torch and transformers made unimportable).
_PRELUDE = textwrap.dedent(
    """
    import json, sys, time

    def peak_rss_mb():  # VmHWM starts afresh at exec (getrusage's maxrss would count the parent's pages)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    if sys.argv[2] == "block":
        exec(sys.argv[3])
    """
)

_PROBE = _PRELUDE + textwrap.dedent(
    """
    start = time.perf_counter()
    from transformers_alignedvq.client import EdgeClient
    imported = time.perf_counter()
    import numpy as np
    client = EdgeClient(sys.argv[1], "http://127.0.0.1:9", threads=1)
    loaded = time.perf_counter()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    client.encode(image, "what color is the shape?")
    times = []
    for _ in range(20):
        t = time.perf_counter(); client.encode(image, "what color is the shape?"); times.append(time.perf_counter() - t)
    times.sort()
    print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "backend": client.edge.backend,
                      "peak_rss_mb": peak_rss_mb(),
                      "ms_per_image": 1000 * times[len(times) // 2],
                      "torch_loaded": "torch" in sys.modules}))
    """
)


_ASK_PROBE = _PRELUDE + textwrap.dedent(
    """
    start = time.perf_counter()
    if sys.argv[4] == "cloud":
        import transformers_alignedvq
        transformers_alignedvq.LlavaAlignedVQForConditionalGeneration
        imported = done = time.perf_counter()
    else:
        from transformers_alignedvq import cli
        from transformers_alignedvq.client import EdgeClient
        imported = time.perf_counter()
        code = cli.main(["ask", "--server", "http://127.0.0.1:9", "--edge", sys.argv[1], "--image", sys.argv[5],
                         "--retry-window", "0", "--threads", "1", "what color is the shape?"])
        assert code == 1, code  # the port is closed: everything but the HTTP exchange ran
        done = time.perf_counter()
    print(json.dumps({"import_s": imported - start, "total_s": done - start, "peak_rss_mb": peak_rss_mb(),
                      "torch": "torch" in sys.modules, "transformers": "transformers" in sys.modules}))
    """
)


def probe(folder: Path, block: bool) -> dict:
    from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES

    out = subprocess.run([sys.executable, "-c", _PROBE, str(folder), "block" if block else "keep", WITHOUT_CLOUD_PACKAGES],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def probe_ask(folder: Path, image: Path, block: bool, what: str) -> dict:
    from transformers_alignedvq.testing import WITHOUT_CLOUD_PACKAGES

    out = subprocess.run([sys.executable, "-c", _ASK_PROBE, str(folder), "block" if block else "keep",
                          WITHOUT_CLOUD_PACKAGES, what, str(image)],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def ask_table(onnx_edge: Path, scratch: Path, runs: int) -> list[str]:
    """The `alignedvq ask` process where torch is installed, blocked, and the cloud import for scale."""
    from PIL import Image

    image = scratch / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(image)
    configs = {"ask, torch installed": (False, "ask"), "ask, torch blocked": (True, "ask"),
               "cloud import (model class)": (False, "cloud")}
    lines = ["", f"`alignedvq ask` (ONNX edge, closed port, no retries): medians of {runs} fresh interpreters.", "",
             "| process | import (s) | whole command (s) | peak RSS (MB) | torch loaded | transformers loaded |",
             "|---|---:|---:|---:|---|---|"]
    for name, (block, what) in configs.items():
        results = [probe_ask(onnx_edge, image, block, what) for _ in range(runs)]
        median = {key: statistics.median(r[key] for r in results) for key in ("import_s", "total_s", "peak_rss_mb")}
        lines.append(f"| {name} | {median['import_s']:.2f} | {median['total_s']:.2f} | {median['peak_rss_mb']:.0f} | "
                     f"{results[0]['torch']} | {results[0]['transformers']} |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    args = p.parse_args(argv)
    import transformers_alignedvq
    from transformers_alignedvq.export.edge_export import export_edge

    model = args.model or transformers_alignedvq.DEFAULT_MODEL
    with tempfile.TemporaryDirectory() as scratch:
        torch_edge = export_edge(model, Path(scratch) / "torch")
        onnx_edge = export_edge(model, Path(scratch) / "onnx", format="onnx")
        configs = {"PyTorch edge": (torch_edge, False), "ONNX edge, no torch": (onnx_edge, True)}
        results = {name: [probe(folder, block) for _ in range(args.runs)] for name, (folder, block) in configs.items()}
        ask_lines = ask_table(onnx_edge, Path(scratch), args.runs)
    lines = [f"Edge process for {Path(model).name}: medians of {args.runs} fresh interpreters, one thread.", "",
             "| edge | import (s) | load (s) | peak RSS (MB) | ms/image | torch loaded |", "|---|---:|---:|---:|---:|---|"]
    for name, runs in results.items():
        median = {key: statistics.median(run[key] for run in runs) for key in ("import_s", "load_s", "peak_rss_mb", "ms_per_image")}
        lines.append(f"| {name} | {median['import_s']:.2f} | {median['load_s']:.2f} | {median['peak_rss_mb']:.0f} | "
                     f"{median['ms_per_image']:.2f} | {runs[0]['torch_loaded']} |")
    lines += ask_lines
    print("\n".join(lines))
    if args.markdown:
        Path(args.markdown).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
