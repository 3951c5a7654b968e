"""Model cards: Hub metadata (with the evaluation as ``model-index``), the AlignedVQ settings, how to use,
finetune and resume, and the files; a title from the model."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .files import checkpoint_files

TEMPLATE_PATH = Path(__file__).parents[1] / "templates" / "model_card.md"


@dataclass(frozen=True)
class CardFamily:
    """How a card names a family: its title, Hub tag, Transformers class, and the edge's geometry argument."""

    title: str
    tag: str
    parent_class: str
    geometry: str = ""  # the argument `encode_edge` and `generate` take beside the image, if any
    edge_files: str = "`edge_config.json`, `edge_model.onnx` and/or `edge_model.safetensors`"


CARD_FAMILIES = {
    "llava_alignedvq": CardFamily("LLaVA", "llava", "LlavaForConditionalGeneration"),
    "llava_next_alignedvq": CardFamily("LLaVA-NeXT", "llava-next", "LlavaNextForConditionalGeneration",
                                       "image_sizes"),
    "llava_onevision_alignedvq": CardFamily("LLaVA-OneVision", "llava-onevision",
                                            "LlavaOnevisionForConditionalGeneration", "image_sizes"),
    "qwen2_5_vl_alignedvq": CardFamily("Qwen2.5-VL", "qwen2.5-vl", "Qwen2_5_VLForConditionalGeneration",
                                       "image_grid_thw", "`qwen_edge.onnx` and `qwen_edge.json`"),
}


def _indices_text(config) -> tuple[int | None, str]:
    """LLaVA's fixed token count per image, or how another family's count follows from the image."""
    if config.model_type == "llava_alignedvq":
        return config.num_image_tokens, ""
    if config.model_type == "qwen2_5_vl_alignedvq":
        patch = config.vision_config.patch_size
        return None, f"one index per {patch}-px patch of the image's grid (`image_grid_thw`)"
    return None, f"{config.tokens_per_tile} indices per tile, tiles per image from its size (`image_sizes`)"


def write_model_card(
    model, directory: Path, *, kind: str, eval_results: dict | None = None, model_name: str | None = None
) -> Path:
    """README.md with Hub metadata and the AlignedVQ settings (and evaluation results when known)."""
    from huggingface_hub import ModelCard, ModelCardData

    from ..wire import bits_per_index

    config = model.config
    family = CARD_FAMILIES[config.model_type]
    bits = bits_per_index(config.codebook_size) * config.codes_per_token
    tokens, tokens_note = _indices_text(config)
    base = config.base_model_name_or_path
    eval_results = eval_results or getattr(model, "alignedvq_eval_results", None) or {}
    model_name = model_name or eval_results.get("model_name") or card_title(config)
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base if base and hub_reference(base)[0] == base else None,  # the Hub's field takes repo ids
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=["alignedvq", family.tag, "vector-quantization", "edge-cloud", "split-inference"],
        datasets=eval_results.get("datasets"),
        license=eval_results.get("license", "apache-2.0"),
        eval_results=card_eval_results(eval_results) or None,
    )
    files = sorted(name for name in checkpoint_files(directory) if name != "README.md")
    template = TEMPLATE_PATH.read_text() if TEMPLATE_PATH.is_file() else None
    card = ModelCard.from_template(
        card_data,
        template_str=template,
        model_name=model_name,
        family=family.title,
        parent_class=family.parent_class,
        geometry=family.geometry,
        edge_files=family.edge_files,
        tokens_note=tokens_note,
        kind=kind,
        base_model=base,
        base_model_revision=config.base_model_revision,
        split_layer=config.split_layer,
        split_site=config.split_site,
        codebook_size=config.codebook_size,
        num_codebooks=config.num_codebooks,
        num_groups=config.num_groups,
        use_dlp=config.use_dlp,
        bits_per_token=bits,
        num_tokens=tokens,
        bytes_per_image=(tokens * bits + 7) // 8 if tokens else None,
        results=eval_results.get("results"),
        files=files,
    )
    path = directory / "README.md"
    card.save(str(path))
    return path


def card_title(config) -> str:
    """The card's title from the model: its base and where it is split (a folder's name, such as a Trainer's
    ``checkpoint-500``, says nothing)."""
    base = hub_reference(config.base_model_name_or_path)[0] if config.base_model_name_or_path else None
    family = CARD_FAMILIES.get(config.model_type)
    name = base.split("/")[-1] if base else family.title if family else "LLaVA"
    return f"{name} AlignedVQ (block {config.split_layer} {config.split_site}, {config.codebook_size} codewords)"


def card_eval_results(eval_results: dict) -> list:
    """``eval_results["results"]`` as the Hub's ``model-index`` entries (visual question answering on the
    first of ``eval_results["datasets"]``)."""
    from huggingface_hub import EvalResult

    datasets = eval_results.get("datasets") or ["custom"]
    return [
        EvalResult(task_type="visual-question-answering", dataset_type=datasets[0], dataset_name=datasets[0],
                   metric_type="accuracy" if "accuracy" in name.lower() else name, metric_name=name,
                   metric_value=value)
        for name, value in (eval_results.get("results") or {}).items()
        if isinstance(value, (int, float))
    ]


def hub_reference(name_or_path) -> tuple[str | None, str | None]:
    """``(repo_id, revision)`` of a checkpoint named by Hub id or by a folder of the Hub cache
    (``.../models--ORG--NAME/snapshots/COMMIT``); ``(None, None)`` for any other local folder."""
    text = str(name_or_path)
    path = Path(text)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name[len("models--"):].replace("--", "/"), path.name
    if path.exists() or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", text):
        return None, None
    return text, None


__all__ = [
    "CARD_FAMILIES",
    "TEMPLATE_PATH",
    "card_eval_results",
    "card_title",
    "hub_reference",
    "write_model_card",
]
