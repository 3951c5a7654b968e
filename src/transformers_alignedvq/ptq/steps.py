"""The model as a list of steps for post-training quantization, and the measures the calibration uses.

`model_steps` runs a model (a plain LLaVA or a split one) as: vision embeddings, vision blocks (for a split model,
the edge's blocks, the AlignedVQ link and the cloud's blocks), feature selection, projector, prompt assembly and
language-model layers. Steps with linear layers belong to a part (``edge``, ``vision``, ``projector``,
``language_model``). `token_entropy` is the activation entropy Q-VLM forms its blocks by; `sample_errors` the
per-sample output error a search minimises.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..models.llava_alignedvq import split

# Submodules of the split block that run on the edge, by site (the rest runs in the cloud).
_EDGE_SUBMODULES = {
    "input": (), "ln1": (), "attn": ("self_attn",), "ln2": ("self_attn",), "mlp": ("self_attn", "mlp"),
}


def token_entropy(hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Normalised activation entropy per sample (see the module docstring): ``(batch, tokens, channels)``
    -> ``(batch,)`` in [0, 1]; ``mask`` ``(batch, tokens)`` leaves padding out. Differentiable."""
    magnitude = hidden.float().abs()
    tokens = torch.full(hidden.shape[:1], hidden.shape[1], device=hidden.device, dtype=torch.float32)
    if mask is not None:
        magnitude = magnitude * mask.unsqueeze(-1).to(magnitude.dtype)
        tokens = mask.sum(1).float()
    p = magnitude / magnitude.sum(1, keepdim=True).clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(1)
    return entropy.mean(-1) / torch.log(tokens.clamp_min(2))


def r_squared(x: Sequence[float], y: Sequence[float]) -> float:
    """Coefficient of determination of the least-squares line through ``(x, y)`` (squared Pearson r)."""
    x, y = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = float((x * x).sum() * (y * y).sum())
    return float((x * y).sum()) ** 2 / denominator if denominator > 0 else 0.0


# --------------------------------------------------------------------------------------------------------
# the model as steps
# --------------------------------------------------------------------------------------------------------
@dataclass
class Step:
    """One stage of the forward pass: ``run(x, batch) -> y``; ``linears`` are the qualified names of its linear
    layers in execution order (empty, with ``part=None``, for steps that hold none)."""

    name: str
    part: str | None
    run: Callable[[torch.Tensor, dict], torch.Tensor]
    linears: list[str] = field(default_factory=list)
    text: bool = False  # its output is language-model tokens (padding is masked out of errors)


def _linear_names(module: nn.Module, prefix: str, submodules: Sequence[str] | None = None) -> list[str]:
    names = []
    for name, child in module.named_modules():
        if isinstance(child, nn.Linear) and (submodules is None or name.split(".")[0] in submodules):
            names.append(f"{prefix}.{name}")
    return names


def _feature_layer(config) -> int:
    layer = config.vision_feature_layer
    if not isinstance(layer, int):
        raise ValueError("Post-training quantization supports a single vision_feature_layer, not a list.")
    return layer if layer >= 0 else config.vision_config.num_hidden_layers + 1 + layer


def _vision_steps(model) -> list[Step]:
    config, tower = model.config, model.model.vision_tower
    blocks, prefix = split.vision_blocks(tower), "model.vision_tower.encoder.layers"
    split_layer = config.split_layer if hasattr(model.model, "alignedvq") else None
    if split_layer is not None and config.split_site == "patch":
        return _patch_split_steps(model, blocks, prefix)
    steps = [Step("vision.embed", None, lambda x, batch: split.embed(tower, x))]
    for index in range(_feature_layer(config)):
        block, name = blocks[index], f"{prefix}.{index}"
        if split_layer is None or index != split_layer:
            part = "edge" if split_layer is not None and index < split_layer else "vision"
            steps.append(Step(f"vision.{index}", part, lambda x, batch, b=block: b(x, None), _linear_names(block, name)))
            continue
        site, layer = config.split_site, model.model.alignedvq
        edge = _EDGE_SUBMODULES[site]
        steps.append(Step(f"vision.{index}.edge", "edge", lambda x, batch, b=block: split.block_to_site(b, x, site),
                          _linear_names(block, name, edge)))
        steps.append(Step("alignedvq", None, lambda x, batch: layer.decode(layer.encode(x), dtype=x.dtype)))
        cloud = [n for n in ("self_attn", "mlp") if n not in edge]
        if cloud:
            steps.append(Step(f"vision.{index}.cloud", "vision",
                              lambda x, batch, b=block: split.block_from_site(b, x, site), _linear_names(block, name, cloud)))
    return steps


def _patch_split_steps(model, blocks, prefix: str) -> list[Step]:
    """The ``patch`` split: the edge is the patch embedding alone (a convolution, no linear layer), the cloud adds
    the positions and runs every block."""
    tower, layer = model.model.vision_tower, model.model.alignedvq
    steps = [Step("vision.patch.edge", None, lambda x, batch: split.patch_content(tower, x)),
             Step("alignedvq", None, lambda x, batch: layer.decode(layer.encode(x), dtype=x.dtype)),
             Step("vision.positions", None, lambda x, batch: split.add_positions(tower, x))]
    for index in range(_feature_layer(model.config)):
        block, name = blocks[index], f"{prefix}.{index}"
        steps.append(Step(f"vision.{index}", "vision", lambda x, batch, b=block: b(x, None), _linear_names(block, name)))
    return steps


def _merge_image_features(model, features: torch.Tensor, batch: dict) -> torch.Tensor:
    """Prompt embeddings with the image placeholders replaced by ``features``; captures the keyword arguments
    the language model passes its layers (mask, position embeddings) into ``batch`` the first time."""
    ids = batch["input_ids"]
    embeds = model.get_input_embeddings()(ids)
    mask = (ids == model.config.image_token_id).unsqueeze(-1)
    embeds = embeds.masked_scatter(mask, features.to(embeds.dtype))
    if "layer_kwargs" not in batch:
        batch["layer_kwargs"] = _layer_kwargs(model.model.language_model, embeds, batch["attention_mask"])
    return embeds


class _Captured(Exception):
    pass


def _layer_kwargs(language_model: nn.Module, embeds: torch.Tensor, attention_mask: torch.Tensor) -> dict:
    captured = {}

    def hook(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    handle = language_model.layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        language_model(inputs_embeds=embeds, attention_mask=attention_mask, use_cache=False)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured


def model_steps(model) -> list[Step]:
    """The forward pass of a LLaVA (or AlignedVQ) model as `Step`s, from pixels to the last decoder layer.
    Every step takes the previous step's output; the first takes ``pixel_values``."""
    config = model.config
    steps = _vision_steps(model)
    if config.vision_feature_select_strategy == "default":
        steps.append(Step("select", None, lambda x, batch: x[:, 1:]))
    projector = model.model.multi_modal_projector
    steps.append(Step("projector", "projector", lambda x, batch: projector(x),
                      _linear_names(projector, "model.multi_modal_projector")))
    steps.append(Step("prompt", None, lambda x, batch: _merge_image_features(model, x, batch)))
    language_model = model.model.language_model
    for index, layer in enumerate(language_model.layers[: config.text_config.num_hidden_layers]):
        steps.append(Step(f"language_model.{index}", "language_model",
                          lambda x, batch, block=layer: block(x, **batch["layer_kwargs"]),
                          _linear_names(layer, f"model.language_model.layers.{index}"), text=True))
    return steps


# --------------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------------
def _rows(x: torch.Tensor, batch: dict, text: bool) -> torch.Tensor:
    """A step's (or layer input's) ``(batch, tokens, dim)`` tensor as ``(rows, dim)``, padding left out."""
    if text:
        return x[batch["attention_mask"].bool()]
    return x.reshape(-1, x.shape[-1])


def sample_errors(output: torch.Tensor, target: torch.Tensor, batch: dict, text: bool) -> torch.Tensor:
    """Mean squared error per sample ``(batch,)``, relative to the target's mean square."""
    squared, energy = (output.float() - target.float()) ** 2, target.float() ** 2
    if text:
        keep = batch["attention_mask"].unsqueeze(-1).float()
        squared, energy = squared * keep, energy * keep
    return squared.flatten(1).sum(1) / energy.flatten(1).sum(1).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------------------
# the calibration pipeline
# --------------------------------------------------------------------------------------------------------


__all__ = ["Step", "model_steps", "r_squared", "sample_errors", "token_entropy"]
