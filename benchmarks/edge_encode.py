"""Edge cost at LLaVA-1.5 scale: CLIP ViT-L/14-336 (random weights), 577 tokens x 1024, K = 4096, one thread.

For each candidate split site, a k-means codebook (K = 4096) is fitted on that site's features of natural photos
(`skimage.data`, random crops) and the edge (pixels -> indices) is timed, side by side in one run (medians,
interleaved so machine noise hits every method alike):

* ``torch, exact``: the PyTorch edge module with the exact search (what the edge ran before the ONNX path);
* ``onnx, exact``: the edge as shipped to ONNX Runtime (`edge_onnx.export_onnx`) with the exact search;
* ``onnx, shortlist``: the same with the low-rank shortlist search (`search.CodewordSearch`);
* ``onnx int8, shortlist``: the same with the front (patch embedding and blocks) in int8, calibrated on photos
  (not at ``patch``, whose only linear layer is folded into the codebook: its ``onnx`` rows have no front);
* ``dense search``: the dense exact search alone on the site features (577 x 1024 against K = 4096), in PyTorch
  (``addmm`` + ``argmin``) and in ONNX Runtime (a graph of ``MatMul`` + ``ArgMin`` built with ``onnx.helper``,
  and the shipped exact search, ``Gemm`` + ``TopK``); the fastest of these is the **dense baseline** every edge is
  compared with (the last column);
* ``search alone: shortlist``: the shipped shortlist search on the site features, without the front.

With ``--stages 2`` (or 3) every edge and search has that many residual VQ stages (`search.ResidualCodewordSearch`;
each stage's codebook fitted by k-means on what the stages before it left), and the dense baseline searches every
stage densely as well; ``dense search: PyTorch, projected then searched`` is the model's own unfolded search
(input DLP applied, then one dense search per stage).

Agreement is the share of tokens of held-out photos (crops of photos the codebook never saw) whose index equals
an fp64 exact search's. The random weights make these timings real (the arithmetic is LLaVA's) but the
agreement only indicative: real CLIP features have another spectrum.

Run it on one core with one thread; other processes on that core show up as noise, so repeat the run:

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/edge_encode.py [--sites patch_0 input_0] [--repeats 15] \
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModel

from transformers_alignedvq.export.edge import AlignedVQEdgeEncoder
from transformers_alignedvq.export.edge_onnx import export_onnx, export_search, quantizes_front
from transformers_alignedvq.export.search import SearchConfig
from transformers_alignedvq.models.llava_alignedvq.quantizer import kmeans
from transformers_alignedvq.preprocess import ImagePreprocessing

DENSE_TORCH = "dense search: PyTorch addmm + argmin"
DENSE_ARGMIN = "dense search: ORT MatMul + ArgMin"
DENSE_SHIPPED = "dense search: ORT Gemm + TopK (shipped exact)"
DENSE_PROJECTED = "dense search: PyTorch, projected then searched"
DENSE = (DENSE_TORCH, DENSE_ARGMIN, DENSE_SHIPPED, DENSE_PROJECTED)
SITES = {"patch_0": (0, "patch"), "input_0": (0, "input"), "ln1_0": (0, "ln1"), "mlp_0": (0, "mlp"), "mlp_1": (1, "mlp")}
FIT_PHOTOS = ("coffee", "colorwheel", "hubble_deep_field", "immunohistochemistry", "retina", "rocket", "camera",
              "coins", "page")
HELD_OUT_PHOTOS = ("astronaut", "chelsea")  # chelsea is the cat of `cat`, which is left out of the fit set


def llava_tower(blocks: int = 24) -> tuple[CLIPVisionConfig, CLIPVisionModel]:
    """LLaVA-1.5's vision config, and a random tower with its first ``blocks`` blocks (the edges use no more;
    initialising all 24 takes minutes on a busy core)."""
    settings = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, image_size=336, patch_size=14,
                    projection_dim=768)
    vision = CLIPVisionConfig(num_hidden_layers=24, **settings)
    return vision, CLIPVisionModel(CLIPVisionConfig(num_hidden_layers=blocks, **settings)).eval()


def photo_crops(names, per_photo: int, seed: int) -> list[Image.Image]:
    import skimage.data

    rng = np.random.default_rng(seed)
    crops = []
    for name in names:
        photo = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
        width, height = photo.size
        for _ in range(per_photo):
            scale = rng.uniform(0.4, 1.0)
            w, h = int(width * scale), int(height * scale)
            x, y = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            crop = photo.crop((x, y, x + w, y + h))
            crops.append(crop.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else crop)
    return crops


def build_edge(vision, tower, layer: int, site: str, fit_pixels: torch.Tensor, kmeans_iters: int,
               stages: int = 1) -> AlignedVQEdgeEncoder:
    settings = dict(split_layer=layer, split_site=site, codebook_size=4096, codebook_dim=1024, num_codebooks=stages,
                    num_groups=1, use_dlp=True)
    edge = AlignedVQEdgeEncoder(vision, settings)
    tower_state = {k.removeprefix("vision_model."): v for k, v in tower.state_dict().items()}
    state = {k: tower_state[k] for k in edge.state_dict() if not k.startswith("alignedvq.")}
    layer_state = edge.alignedvq.state_dict()
    generator = torch.Generator().manual_seed(0)
    layer_state["dlp_in.gate"] = torch.tensor(0.1)  # a finetuned DLP has a non-zero gate; folding must handle it
    layer_state["dlp_in.proj.weight"] = 0.02 * torch.randn(1024, 1024, generator=generator)
    layer_state["dlp_in.proj.bias"] = torch.zeros(1024)
    edge.load_state_dict({**state, **{f"alignedvq.{k}": v for k, v in layer_state.items() if "quantizer" not in k},
                          "alignedvq.quantizer.codebook": torch.zeros(stages, 1, 4096, 1024)})
    with torch.no_grad():
        features = torch.cat([edge_features(edge, batch) for batch in fit_pixels.split(8)]).reshape(-1, 1024)
        weight, bias = edge.alignedvq._pre_quantization_affine()
        residual = features @ weight.T + bias
        for stage in range(stages):  # residual VQ: each stage's k-means on what the stages before it left
            codebook, _ = kmeans(residual, 4096, iters=kmeans_iters, generator=generator)
            edge.alignedvq.quantizer.codebook[stage, 0].copy_(codebook)
            residual = residual - codebook[torch.cdist(residual, codebook).argmin(-1)]
    return edge.refresh_search().eval()


def exact_reference(edge, features: torch.Tensor) -> torch.Tensor:
    """fp64 exact residual search of the projected features: indices ``(tokens * stages,)``, stage-minor."""
    weight, bias = edge.alignedvq._pre_quantization_affine()
    residual = (features.reshape(-1, 1024) @ weight.T + bias).double()
    found = []
    for codebook in edge.alignedvq.quantizer.codebook[:, 0].double():
        found.append(torch.cdist(residual, codebook).argmin(-1))
        residual = residual - codebook[found[-1]]
    return torch.stack(found, -1).reshape(-1)


def on_features(label: str) -> bool:
    """Rows that time a search alone (fed site features), not a whole edge (fed pixels)."""
    return label.startswith(("search", "dense"))


def edge_features(edge, pixels: torch.Tensor) -> torch.Tensor:
    from transformers_alignedvq.models.llava_alignedvq import split

    return split.edge_forward(edge, pixels, edge.settings["split_layer"], edge.settings["split_site"])


def onnx_session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def profile_ops(path: Path, feed: dict, runs: int = 30, top: int = 6) -> list[tuple[str, float]]:
    """ONNX Runtime's own profile of a graph: ms per run of its costliest op types (one thread)."""
    import collections

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as scratch:
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
        options.enable_profiling, options.profile_file_prefix = True, str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    per_op = collections.Counter()
    for event in events:
        # a Scan's time is that of the nodes of its body, which are listed themselves
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time") and event["args"]["op_name"] != "Scan":
            per_op[event["args"]["op_name"]] += event["dur"] / 1000 / runs
    return per_op.most_common(top)


def dense_matmul_argmin(search, path: Path) -> Path:
    """The textbook dense exact search in ONNX: ``ArgMin(features @ (-2 E)ᵀ + offsets)``, built with onnx.helper."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    table = numpy_helper.from_array((-2.0 * search.folded.T).contiguous().numpy(), "table")
    offsets = numpy_helper.from_array(search.offsets.numpy(), "offsets")
    nodes = [helper.make_node("MatMul", ["features", "table"], ["products"]),
             helper.make_node("Add", ["products", "offsets"], ["scores"]),
             helper.make_node("ArgMin", ["scores"], ["indices"], axis=-1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "dense_search", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", "tokens", 1024])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, ["batch", "tokens"])], [table, offsets])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def interleaved_medians(methods: dict, repeats: int) -> dict[str, float]:
    for run in methods.values():  # warm-up
        run()
    samples = {name: [] for name in methods}
    for _ in range(repeats):
        for name, run in methods.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(times) for name, times in samples.items()}


def measure_site(name: str, args, vision, tower, fit_pixels, held_pixels, calibration, scratch: Path) -> list[dict]:
    layer, site = SITES[name]
    edge = build_edge(vision, tower, layer, site, fit_pixels, args.kmeans_iters, args.stages)
    with torch.no_grad():
        held_features = torch.cat([edge_features(edge, batch) for batch in held_pixels.split(8)])
        reference = exact_reference(edge, held_features)
    shortlist = SearchConfig("shortlist", rank=args.rank, candidates=args.candidates)
    paths = {"onnx, exact": export_onnx(edge, scratch / f"{name}_exact.onnx")}
    dense_search = edge.search
    edge.refresh_search(shortlist)
    fast_search = edge.search
    paths["onnx, shortlist"] = export_onnx(edge, scratch / f"{name}_shortlist.onnx")
    if quantizes_front(edge, True):
        paths["onnx int8, shortlist"] = export_onnx(edge, scratch / f"{name}_int8.onnx", int8=True,
                                                    calibration=calibration)
    features = held_features[:1]
    if args.stages == 1:  # the textbook graph has one stage; the shipped exact graph below has them all
        paths[DENSE_ARGMIN] = dense_matmul_argmin(dense_search, scratch / f"{name}_dense_argmin.onnx")
    for label, search in ((DENSE_SHIPPED, dense_search), ("search alone: shortlist", fast_search)):
        edge.search = search
        paths[label] = export_search(edge, scratch / f"{name}_search_{label[-5:]}.onnx", held_features[:2])
    sessions = {label: onnx_session(path) for label, path in paths.items()}
    one = held_pixels[:1]
    edge.refresh_search(SearchConfig())
    layer_encode = edge.alignedvq.encode if args.stages == 1 else (  # the model's own search (unfolded stages)
        lambda f: edge.alignedvq.quantizer.encode(edge.alignedvq.pre_quantization(f)))
    methods = {"torch, exact": lambda: edge(one), DENSE_TORCH: lambda: dense_search(features),
               DENSE_PROJECTED: lambda: layer_encode(features)}
    for label, session in sessions.items():
        feed = {"features": features.numpy()} if on_features(label) else {"pixel_values": one.numpy()}
        methods[label] = lambda s=session, f=feed: s.run(None, f)
    with torch.inference_mode():
        times = interleaved_medians(methods, args.repeats)
        agreement = {"torch, exact": float((edge(held_pixels).reshape(-1) == reference).float().mean()),
                     DENSE_TORCH: float((dense_search(held_features).reshape(-1) == reference).float().mean()),
                     DENSE_PROJECTED: float((layer_encode(held_features).reshape(-1) == reference).float().mean())}
    for label, session in sessions.items():
        inputs = held_features if on_features(label) else held_pixels
        key = "features" if on_features(label) else "pixel_values"
        got = np.concatenate([session.run(None, {key: b.numpy()})[0] for b in inputs.split(8)])
        agreement[label] = float((torch.from_numpy(got).reshape(-1) == reference).float().mean())
    shipped = "onnx int8, shortlist" if "onnx int8, shortlist" in paths else "onnx, shortlist"
    profile = profile_ops(paths[shipped], {"pixel_values": one.numpy()}) if args.profile else None
    return [{"site": name, "method": label, "ms": times[label], "agreement": agreement[label],
             "onnx_bytes": paths[label].stat().st_size if label in paths else None,
             **({"profile": profile} if profile and label == shipped else {})} for label in methods]


def dense_baseline(rows: list[dict], site: str) -> dict:
    """The fastest dense exact search measured at ``site``."""
    return min((r for r in rows if r["site"] == site and r["method"] in DENSE), key=lambda r: r["ms"])


def table(rows: list[dict], args, tokens: int) -> str:
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else "?"
    lines = [f"LLaVA-1.5 edge (CLIP ViT-L/14-336, random weights), K=4096 x {args.stages} residual stage(s), one "
             f"ONNX Runtime / PyTorch thread "
             f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, CPUs {affinity}), medians of "
             f"{args.repeats} interleaved repeats; shortlist rank {args.rank}, {args.candidates} candidates; "
             f"agreement on {tokens} held-out photo tokens",
             "| site | method | ms/image | vs torch exact edge | vs dense baseline | agreement with exact search |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        torch_edge = next(r["ms"] for r in rows if r["site"] == row["site"] and r["method"] == "torch, exact")
        baseline = dense_baseline(rows, row["site"])
        lines.append(f"| {row['site']} | {row['method']} | {row['ms']:.1f} | {row['ms'] / torch_edge:.2f}x | "
                     f"{row['ms'] / baseline['ms']:.2f}x | {100 * row['agreement']:.2f}% |")
    for row in rows:
        if row.get("profile"):
            ops = ", ".join(f"{op} {ms:.2f}" for op, ms in row["profile"])
            lines.append(f"\nProfile of {row['site']} {row['method']} (ms per image, costliest op types): {ops}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sites", nargs="+", default=list(SITES), choices=list(SITES))
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--rank", type=int, default=32, help="shortlist: dimensions of the first pass")
    p.add_argument("--candidates", type=int, default=8, help="shortlist: codewords re-ranked exactly")
    p.add_argument("--fit-crops", type=int, default=12, help="crops per fit photo (577 features each)")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--stages", type=int, default=1, help="residual VQ stages (codebooks of K = 4096 each)")
    p.add_argument("--json", default=None, help="write the rows to this file")
    p.add_argument("--profile", action="store_true", help="also print ONNX Runtime's per-op profile of each shipped edge")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vision, tower = llava_tower(blocks=max(SITES[name][0] for name in args.sites) + 1)
    prep = ImagePreprocessing.for_vision_config("clip_vision_model", 336)
    pixels = lambda crops: torch.from_numpy(np.concatenate([prep(c) for c in crops]))  # noqa: E731
    fit_pixels = pixels(photo_crops(FIT_PHOTOS, args.fit_crops, seed=0))
    held_pixels = pixels(photo_crops(HELD_OUT_PHOTOS, 8, seed=1))
    calibration = [prep(c) for c in photo_crops(FIT_PHOTOS, 4, seed=2)]
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.sites:
            rows += measure_site(name, args, vision, tower, fit_pixels, held_pixels, calibration, Path(scratch))
            print(f"measured {name}", file=sys.stderr, flush=True)
    print(table(rows, args, held_pixels.shape[0] * 577))
    if args.json:
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        Path(args.json).write_text(json.dumps({"args": vars(args), "cpus": cpus, "cpu_count": os.cpu_count(),
                                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "rows": rows},
                                              indent=1))


if __name__ == "__main__":
    main()
