"""Build the AlignedVQ easy-VQA model that ships inside the package (`transformers_alignedvq.TINY_EASYVQA`).

    python examples/train_base_easyvqa.py --output runs/base-easyvqa          # the base LLaVA (once)
    python examples/build_bundled_model.py --base runs/base-easyvqa
    python examples/build_bundled_model.py --base runs/base-easyvqa --finetuned runs/split_full/patch_0_rvq2__s0

Steps: AlignedVQ finetune of the base (the recipe of `split_study.py`'s report: K=4096, DLP, LoRA merged afterwards;
k-means on 2,000 training images, two epochs) with VQ at the patch embeddings (`--split-site patch`, before the
position embeddings, which the cloud adds) and two residual codebooks (`--num-codebooks 2`): the cheapest edge
there is (no ViT block, the patch convolution folded into the codebook), chosen on validation and reported on
test over three seeds in `docs/edge.md`. Then the entropy model of coded wire frames (`fit_entropy_model.py`, on
the training split), evaluation of the base and of the AlignedVQ model on the full easy-VQA test split, and a
model card carrying those numbers, written into the package's assets folder and checked by loading it back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from transformers_alignedvq import SPLIT_SITES, LlavaAlignedVQForConditionalGeneration  # noqa: E402
from transformers_alignedvq.evaluation import evaluate_vqa  # noqa: E402
from transformers_alignedvq.export.edge_export import export_onnx_folder  # noqa: E402
from transformers_alignedvq.hub import has_lora, merge_lora_, write_model_card  # noqa: E402
from transformers_alignedvq.training.data import load_easy_vqa  # noqa: E402
from transformers_alignedvq.training.entropy_fit import fit as fit_entropy_model  # noqa: E402
from transformers_alignedvq.training.finetune import main as finetune  # noqa: E402

ASSETS = Path(__file__).resolve().parents[1] / "src" / "transformers_alignedvq" / "assets" / "tiny-easyvqa"


def fit_entropy(model, processor):
    """The entropy model of coded frames, fitted on the training split by `fit_entropy_model.py`."""
    with tempfile.TemporaryDirectory() as scratch:
        model.edge_encoder(processor).save_pretrained(scratch)
        return fit_entropy_model(Path(scratch))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True)
    p.add_argument("--output", default=str(ASSETS))
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--split-layer", type=int, default=0)
    p.add_argument(
        "--split-site", default="patch", choices=list(SPLIT_SITES),
        help="patch (with --num-codebooks 2) is the cheapest edge within half a point of the base on easy-VQA "
        "(docs/edge.md: chosen on validation, three seeds on test); ln1 is the paper's site",
    )
    p.add_argument("--num-codebooks", type=int, default=2, help="residual VQ stages")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--codebook-size", type=int, default=4096)
    p.add_argument(
        "--storage-dtype", choices=["float16", "float32"], default="float16",
        help="dtype of the stored weights (float16 halves the package); the model loads and runs in float32 either "
        "way (fp16 matmuls are slow on CPUs), and is evaluated with exactly the stored values",
    )
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--limit", type=int, default=None, help="smoke runs: first N train/test questions")
    p.add_argument(
        "--finetuned", default=None,
        help="package this finetune output (e.g. the headline run of paper_in_miniature.py, the same recipe) "
        "instead of finetuning again; its LoRA is merged",
    )
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.finetuned:
        return package(args, Path(args.finetuned))
    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="alignedvq-bundle-"))
    argv = ["--base", args.base, "--output", str(work), "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--batch-size", str(args.batch_size), "--codebook-size", str(args.codebook_size), "--no-progress",
            "--split-layer", str(args.split_layer), "--split-site", args.split_site,
            "--num-codebooks", str(args.num_codebooks),
            "--merge-lora", "--logging-steps", "50"]
    if args.limit:
        argv += ["--limit", str(args.limit), "--calibration-images", "16", "--kmeans-iters", "2"]
    else:
        argv += ["--calibration-images", str(args.calibration_images)]
    finetune(argv)
    train_seconds = time.time() - started
    package(args, work, train_seconds=train_seconds, epochs=args.epochs)
    shutil.rmtree(work, ignore_errors=True)


def package(args, work: Path, *, train_seconds: float | None = None, epochs: float | None = None) -> dict:
    """Evaluate the finetuned model in ``work`` and write the bundle (merged LoRA, entropy model, card)."""
    if train_seconds is None:  # an existing finetune: its own Trainer log says how long and how far it trained
        log = json.loads((work / "training_log.json").read_text())
        final = next(entry for entry in reversed(log) if "train_runtime" in entry)
        train_seconds, epochs = final["train_runtime"], round(final["epoch"], 3)
    processor = AutoProcessor.from_pretrained(args.base)
    model = LlavaAlignedVQForConditionalGeneration.from_pretrained(work).eval()
    if has_lora(model):
        merge_lora_(model)
    if args.storage_dtype == "float16":  # evaluate the fp16-rounded weights that ship (the codebook stays fp32)
        model = model.half().float()
    test = load_easy_vqa("test", limit=args.limit)
    entropy_model = fit_entropy(model, processor)
    ours = evaluate_vqa(model, processor, test, batch_size=256, entropy_model=entropy_model)
    base = evaluate_vqa(LlavaForConditionalGeneration.from_pretrained(args.base).eval(), processor, test, batch_size=256)
    summary = {
        "test_questions": ours["num_examples"],
        "alignedvq_accuracy": ours["accuracy"],
        "base_accuracy": base["accuracy"],
        "frame_bytes_per_image": ours["bytes_per_image"],
        "entropy_coded_frame_bytes_per_image": ours.get("entropy_coded_bytes_per_image"),
        "png_bytes_per_image": base["bytes_per_image"],
        "finetune_seconds": train_seconds,
        "finetune_epochs": epochs,
        "finetuned_from": str(args.finetuned) if args.finetuned else "this script",
        "storage_dtype": args.storage_dtype,
    }
    print(json.dumps(summary, indent=2))

    output = Path(args.output)
    if output.exists():
        shutil.rmtree(output)
    model.config.base_model_name_or_path = None
    results = {
        "model_name": "tiny-easyvqa-alignedvq",
        "datasets": ["easy-vqa"],
        "results": {
            "easy-VQA test accuracy, AlignedVQ (%)": f"{100 * ours['accuracy']:.2f}",
            "easy-VQA test accuracy, base LLaVA on PNG images (%)": f"{100 * base['accuracy']:.2f}",
            "bytes per image (wire frame, bit-packed)": f"{ours['bytes_per_image']:.0f}",
            "bytes per image (wire frame, coded)": f"{ours.get('entropy_coded_bytes_per_image', 0):.1f}",
            "bytes per image (PNG)": f"{base['bytes_per_image']:.1f}",
            "test questions": str(ours["num_examples"]),
        },
    }
    if args.storage_dtype == "float16":
        model.half()  # in place, for the write only (the quantizer's codebook stays fp32)
    # no EMA statistics: they are training state, and the bundle is for inference (they would double its codebook)
    model.save_pretrained(output, checkpoint_kind="full", eval_results=results, include_ema_state=False)
    model.float()
    # The bundle is always loaded through the installed package, so it drops the remote-code copies of the
    # package's sources (they would only duplicate them and go stale) and the auto_map pointing at them.
    from transformers_alignedvq.hub import REMOTE_CODE_FILES

    for name in REMOTE_CODE_FILES:
        (output / name).unlink(missing_ok=True)
    config = json.loads((output / "config.json").read_text())
    config.pop("auto_map", None)
    config["dtype"] = "float32"  # what `from_pretrained` (dtype="auto") loads, whatever the stored dtype
    (output / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    processor.save_pretrained(output)
    entropy_model.save(output)
    # The fp32 ONNX edge beside the PyTorch one, so a device with only the [edge] extra (no PyTorch) runs the
    # bundled model's edge by default; it also rewrites edge_config.json with the preprocessing and search.
    export_onnx_folder(model.edge_encoder(processor), output)
    write_model_card(model, output, kind="full", eval_results=results)  # again: lists the final files
    (output / "build_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    check_bundle(model, processor, test, ours, output)
    print(f"wrote {output} ({sum(f.stat().st_size for f in output.rglob('*') if f.is_file()) / 1e6:.1f} MB)")
    return summary


def check_bundle(model, processor, test, ours: dict, output: Path, questions: int = 128) -> None:
    """The written bundle, loaded the way users load it, gives the evaluated model's weights and answers."""
    from transformers import AutoModel

    loaded = AutoModel.from_pretrained(output).eval()
    if loaded.dtype != torch.float32:
        raise RuntimeError(f"{output} loads as {loaded.dtype}, expected torch.float32")
    # Every weight, and the codebook (a buffer); the EMA statistics are training state and are not saved.
    weights = {**dict(model.named_parameters()), "model.alignedvq.quantizer.codebook": model.model.alignedvq.quantizer.codebook}
    loaded_state = loaded.state_dict()
    differing = [k for k, v in weights.items() if k not in loaded_state or not torch.equal(v, loaded_state[k])]
    if differing:
        raise RuntimeError(f"{output} does not hold the evaluated weights: {differing[:5]}")
    subset = test.select(range(min(questions, len(test))))
    again = evaluate_vqa(loaded, processor, subset, batch_size=questions)["predictions"]
    if again != ours["predictions"][: len(subset)]:
        raise RuntimeError(f"{output} answers differently from the evaluated model")


if __name__ == "__main__":
    main()
