"""How big each checkpoint kind is, and what an edge device downloads.

    python examples/hub_sizes.py              # tiny checkpoints in a temporary folder
    python examples/hub_sizes.py --out sizes  # keep them (and the 7B edge/AlignedVQ files) in ./sizes

1. Saves a tiny random LLaVA split by AlignedVQ (fp16, fp32 codebook, LoRA r=4 on q/v) as an adapter-only
   checkpoint and as a full one with the LoRA merged, and lists every file with its real size.
2. Gives the same weight files for LLaVA-1.5-7B (CLIP ViT-L/14-336 + Vicuna-7B in fp16, split at block 0
   `ln1`, codebook 4096 x 1024 fp32, DLP, LoRA r=128 on q/k/v/o/gate/up/down of all 32 layers in fp16). The
   model is built on the meta device, so no 7B weights are allocated: the two big files (full weights, LoRA)
   are sized from their tensors' names, dtypes and shapes with safetensors' layout, an arithmetic first
   checked byte-exact against the tiny model's real files; the AlignedVQ and edge files are small and are
   written for real by the package's own save code.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from transformers_alignedvq import AlignedVQConfig, LlavaAlignedVQForConditionalGeneration
from transformers_alignedvq.hub import ALIGNEDVQ_WEIGHTS_NAME, alignedvq_state_dict, checkpoint_files
from transformers_alignedvq.lora import add_lora, lora_state_dict

LLAVA_7B_CONFIG = Path(__file__).resolve().parents[1] / "tests" / "data" / "llava-1.5-7b-hf.config.json"
EMA_KEYS = ("model.alignedvq.quantizer.cluster_size", "model.alignedvq.quantizer.embed_sum")
EDGE_FILES = ("edge_config.json", "edge_model.safetensors")
LORA_7B_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# safetensors lays tensors out by dtype, in descending order of its dtype enum, then by name.
_SAFETENSORS_DTYPES = {
    torch.bool: ("BOOL", 0), torch.uint8: ("U8", 4), torch.int8: ("I8", 5), torch.int16: ("I16", 9),
    torch.float16: ("F16", 11), torch.bfloat16: ("BF16", 12), torch.int32: ("I32", 13), torch.float32: ("F32", 15),
    torch.float64: ("F64", 16), torch.int64: ("I64", 17),
}


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict | None = None, dtype: torch.dtype | None = None) -> int:
    """Bytes of the safetensors file ``save_file(tensors, metadata=metadata)`` would write, from names, dtypes and
    shapes only (meta tensors are fine). ``dtype`` sizes the tensors as if cast to it."""
    def dtype_of(t):
        return dtype or t.dtype

    order = sorted(tensors, key=lambda name: (-_SAFETENSORS_DTYPES[dtype_of(tensors[name])][1], name))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = metadata
    for name in order:
        t = tensors[name]
        nbytes = t.numel() * dtype_of(t).itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype_of(t)][0], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    length = len(json.dumps(header, separators=(",", ":")).encode())
    return 8 + length + (-length) % 8 + offset  # u64 header length, header padded to 8 bytes, data


def full_weights(model) -> dict[str, torch.Tensor]:
    """The tensors of a full checkpoint's model.safetensors (LoRA merged, no EMA state) under the names Transformers
    writes them with (tied weights dropped, llava-hf's original names restored)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    state = {k: v for k, v in model.state_dict().items() if k not in EMA_KEYS}
    return revert_weight_conversion(model, remove_tied_weights_from_state_dict(state, model))


def lora_weights(model) -> dict[str, torch.Tensor]:
    """The tensors of lora/adapter_model.safetensors, named as PEFT's format wants them."""
    return lora_state_dict(model)


def human(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def print_table(title: str, columns: list[str], rows: dict[str, list[int | None]]) -> None:
    print(f"\n{title}\n")
    print("| file | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, sizes in rows.items():
        print(f"| {name} | " + " | ".join("–" if s is None else f"{s:,} ({human(s)})" for s in sizes) + " |")


# --------------------------------------------------------------------------------------------------------
def tiny(out: Path) -> tuple[dict[str, dict[str, int]], int]:
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                              image_size=112, patch_size=14)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256, pad_token_id=0)
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=255,
                                                      image_seq_length=64)).eval()
    llava.save_pretrained(out / "base")
    model = LlavaAlignedVQForConditionalGeneration.from_llava(llava, codebook_size=256)
    model.config.base_model_name_or_path = str(out / "base")
    add_lora(model, LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False))
    model.half()  # as a 7B model is shared: fp16 weights and LoRA; the codebook stays fp32

    predicted = {"adapter/lora/adapter_model.safetensors": safetensors_size(lora_weights(model), {"format": "pt"})}
    model.save_pretrained(out / "adapter", checkpoint_kind="adapter")
    model.save_pretrained(out / "full", checkpoint_kind="full", merge_lora=True)
    predicted["full/model.safetensors"] = safetensors_size(full_weights(model), {"format": "pt"})
    predicted[f"adapter/{ALIGNEDVQ_WEIGHTS_NAME}"] = safetensors_size(alignedvq_state_dict(model), {"format": "pt"})
    for path, size in predicted.items():
        real = (out / path).stat().st_size
        assert size == real, f"size arithmetic is off for {path}: {size} computed, {real} on disk"
    return {kind: checkpoint_files(out / kind) for kind in ("full", "adapter")}, len(predicted)


def llava_7b(out: Path) -> dict[str, int]:
    config = AlignedVQConfig.from_llava_config(
        LlavaConfig.from_pretrained(LLAVA_7B_CONFIG), split_layer=0, split_site="ln1", codebook_size=4096)
    with torch.device("meta"):
        model = LlavaAlignedVQForConditionalGeneration(config)
    model.half()
    sizes = {"model.safetensors": safetensors_size(full_weights(model), {"format": "pt"})}

    # Materialise only what the AlignedVQ and edge files hold (about 7M parameters) and save them for real.
    tower = model.model.vision_tower
    for module in (tower.embeddings, tower.pre_layrnorm, *tower.encoder.layers[: config.split_layer + 1], model.model.alignedvq):
        module.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                tensor.zero_()  # to_empty leaves whatever was in memory
    out.mkdir(parents=True, exist_ok=True)
    save_file(alignedvq_state_dict(model), str(out / ALIGNEDVQ_WEIGHTS_NAME), metadata={"format": "pt"})
    model.edge_encoder().save_pretrained(out)
    for name in (ALIGNEDVQ_WEIGHTS_NAME, "edge_config.json", "edge_model.safetensors"):
        sizes[name] = (out / name).stat().st_size

    with torch.device("meta"):  # PEFT creates the LoRA layers on the meta device too
        add_lora(model, LoraConfig(r=128, lora_alpha=256, target_modules=LORA_7B_TARGETS))
    sizes["lora/adapter_model.safetensors"] = safetensors_size(lora_weights(model), {"format": "pt"}, dtype=torch.float16)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        files, checked = tiny(out / "tiny")
        big = llava_7b(out / "llava-1.5-7b")

    names = sorted(set(files["full"]) | set(files["adapter"]), key=lambda n: (not n.endswith(".safetensors"), n))
    edge = {n: files["full"][n] for n in EDGE_FILES if n in files["full"]}
    rows = {n: [files["full"].get(n), files["adapter"].get(n), edge.get(n)] for n in names}
    rows["**total**"] = [sum(files["full"].values()), sum(files["adapter"].values()), sum(edge.values())]
    print_table("Tiny model (real files; LoRA merged into the full checkpoint):",
                ["full", "adapter", "edge download"], rows)
    print(f"\n(safetensors size arithmetic checked byte-exact against {checked} of these files)")

    small = sum(size for name, size in files["adapter"].items() if not name.endswith(".safetensors")) - files["adapter"]["edge_config.json"]
    rows = {
        "model.safetensors (computed)": [big["model.safetensors"], None, None],
        ALIGNEDVQ_WEIGHTS_NAME: [None, big[ALIGNEDVQ_WEIGHTS_NAME], None],
        "lora/adapter_model.safetensors (computed)": [None, big["lora/adapter_model.safetensors"], None],
        "edge_model.safetensors": [big["edge_model.safetensors"]] * 3,
        "edge_config.json": [big["edge_config.json"]] * 3,
    }
    totals = [sum(size for size in column if size is not None) for column in zip(*rows.values())]
    rows["**total**"] = totals
    print_table("LLaVA-1.5-7B (fp16; codebook 4096 x 1024 fp32; LoRA r=128, fp16):",
                ["full (LoRA merged)", "adapter", "edge download"], rows)
    print(f"\nBoth kinds also carry configs, modeling code and the card: about {human(small)} (the tiny model's).")
    print(f"The adapter checkpoint is {totals[0] / totals[1]:.1f}x smaller than the full one; the edge download is "
          f"{totals[0] / totals[2]:.0f}x smaller.")


if __name__ == "__main__":
    main()
