"""Running a pre-norm vision transformer in two halves around a split site.

Works on any tower shaped like Transformers' CLIP/SigLIP vision models: ``tower.embeddings``, an optional
``tower.pre_layrnorm``, and blocks ``tower.encoder.layers[i]`` with ``layer_norm1``, ``self_attn``,
``layer_norm2`` and ``mlp``, computing ``h = x + attn(ln1(x)); out = h + mlp(ln2(h))``. No Transformers
import: the edge uses these functions on the edge-only module too.

Sites inside block ``b``: ``input`` (the block input, i.e. the residual stream: for ``b = 0`` the embeddings after
the pre-LayerNorm, for ``b > 0`` the same tensor as ``mlp`` of block ``b - 1``), ``ln1``, ``attn``, ``ln2``, ``mlp``
(the block output). Before block 0 only: ``patch``, the patch embeddings (and the class embedding) before the
position embeddings and the pre-LayerNorm, which the cloud adds: what crosses the split is then the content of
each patch alone, the same codebook serving every position.

Hidden-state numbering follows Transformers: hidden state 0 is the embeddings output (after the pre-LayerNorm),
hidden state ``i`` is the output of block ``i - 1``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

SPLIT_SITES = ("patch", "input", "ln1", "attn", "ln2", "mlp")


def first_cloud_block(split_layer: int, site: str) -> int:
    """Index of the first vision block the cloud runs whole: the split block itself when the edge stops at its
    input (or at the patch embeddings before block 0), else the next one."""
    return split_layer + (0 if site in ("patch", "input") else 1)


def vision_blocks(tower: nn.Module) -> nn.ModuleList:
    """The tower's list of transformer blocks."""
    encoder = getattr(tower, "encoder", None)
    layers = getattr(encoder, "layers", None)
    if layers is None:
        raise TypeError(
            f"{type(tower).__name__} has no `encoder.layers`; AlignedVQ splits CLIP/SigLIP-style vision towers."
        )
    return layers


def embed(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Patch + position embeddings and the pre-LayerNorm: hidden state 0, ``(batch, tokens, hidden)``."""
    dtype = tower.embeddings.patch_embedding.weight.dtype
    hidden = tower.embeddings(pixel_values.to(dtype))
    pre_norm = getattr(tower, "pre_layrnorm", None)
    return pre_norm(hidden) if pre_norm is not None else hidden


def patch_content(tower: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """The ``patch`` site: class embedding (where the tower has one) and patch embeddings, without positions:
    ``(batch, tokens, hidden)``."""
    embeddings = tower.embeddings
    dtype = embeddings.patch_embedding.weight.dtype
    patches = embeddings.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
    cls = getattr(embeddings, "class_embedding", None)
    if cls is None:
        return patches
    return torch.cat([cls.to(patches.dtype).expand(patches.shape[0], 1, -1), patches], dim=1)


def add_positions(tower: nn.Module, content: torch.Tensor) -> torch.Tensor:
    """Cloud side of ``patch``: position embeddings and the pre-LayerNorm -> hidden state 0."""
    embeddings = tower.embeddings
    hidden = content + embeddings.position_embedding(embeddings.position_ids)
    pre_norm = getattr(tower, "pre_layrnorm", None)
    return pre_norm(hidden) if pre_norm is not None else hidden


def check_pixel_values(pixel_values, *, num_channels: int, image_size: int) -> None:
    """Raise ``ValueError`` unless ``pixel_values`` is a float tensor ``(batch, num_channels, size, size)``."""
    expected = (num_channels, image_size, image_size)
    if not isinstance(pixel_values, torch.Tensor):
        raise ValueError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}.")
    if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != expected:
        raise ValueError(
            f"pixel_values must have shape (batch_size, {num_channels}, {image_size}, {image_size}), got "
            f"{tuple(pixel_values.shape)}; resize images with the model's image processor."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(f"pixel_values must be floating point, got {pixel_values.dtype}.")


def _attention(block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    out = block.self_attn(hidden_states=normed, attention_mask=None)
    return out[0] if isinstance(out, tuple) else out


def block_to_site(block: nn.Module, x: torch.Tensor, site: str) -> torch.Tensor:
    """Edge half of a block: block input ``x`` -> the features at ``site``."""
    if site == "input":
        return x
    normed = block.layer_norm1(x)
    if site == "ln1":
        return normed
    hidden = x + _attention(block, normed)
    if site == "attn":
        return hidden
    normed = block.layer_norm2(hidden)
    if site == "ln2":
        return normed
    return hidden + block.mlp(normed)


def block_from_site(block: nn.Module, z: torch.Tensor, site: str) -> torch.Tensor:
    """Cloud half of a block: recovered site features ``z`` -> the block output. ``z`` stands in for the
    residual stream as well, since nothing else crosses the split."""
    if site == "mlp":
        return z
    if site == "input":
        return block(z, None)
    if site == "ln1":
        z = z + _attention(block, z)
    if site in ("ln1", "attn"):
        return z + block.mlp(block.layer_norm2(z))
    return z + block.mlp(z)  # ln2


def edge_forward(tower: nn.Module, pixel_values: torch.Tensor, split_layer: int, site: str) -> torch.Tensor:
    """Everything the edge computes before quantization: ``(batch, tokens, hidden)`` site features."""
    if site == "patch":
        return patch_content(tower, pixel_values)
    blocks = vision_blocks(tower)
    hidden = embed(tower, pixel_values)
    for block in blocks[:split_layer]:
        hidden = block(hidden, None)
    return block_to_site(blocks[split_layer], hidden, site)


def cloud_forward(
    tower: nn.Module, z: torch.Tensor, split_layer: int, site: str, wanted: list[int]
) -> dict[int, torch.Tensor]:
    """Everything after the split, stopping at the last hidden state in ``wanted``.

    Returns ``{hidden_state_index: tensor}`` for each index in ``wanted`` (all ``> split_layer``). Blocks
    after the last wanted hidden state are skipped: LLaVA-1.5 reads hidden state -2, so its final vision
    block never runs.
    """
    if site == "patch":
        z, site = add_positions(tower, z), "input"
    blocks = vision_blocks(tower)
    hidden = block_from_site(blocks[split_layer], z, site)
    index = split_layer + 1
    out = {index: hidden} if index in wanted else {}
    for block in blocks[index : max(wanted)]:
        hidden = block(hidden, None)
        index += 1
        if index in wanted:
            out[index] = hidden
    return out


def edge_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, split_layer: int) -> list[torch.Tensor]:
    """Hidden states ``0 .. split_layer`` (the inputs of blocks ``0 .. split_layer``) as the edge computes them,
    before quantization: for the tower's per-layer outputs, which the cloud alone cannot give."""
    hidden = embed(tower, pixel_values)
    states = [hidden]
    for block in vision_blocks(tower)[:split_layer]:
        hidden = block(hidden, None)
        states.append(hidden)
    return states


@contextmanager
def recorded_attentions(tower: nn.Module, enabled: bool = True):
    """Collect the attention weights of every block that runs inside the ``with`` body, in layer order (the
    blocks run in that order). Weights exist with eager attention only (fused kernels return ``None``)."""
    weights: list = []
    if not enabled:
        yield weights
        return
    hooks = [block.self_attn.register_forward_hook(lambda module, args, out: weights.append(out[1]))
             for block in vision_blocks(tower)]
    try:
        yield weights
    finally:
        for hook in hooks:
            hook.remove()


__all__ = [
    "SPLIT_SITES",
    "add_positions",
    "block_from_site",
    "block_to_site",
    "check_pixel_values",
    "cloud_forward",
    "edge_forward",
    "edge_hidden_states",
    "embed",
    "first_cloud_block",
    "patch_content",
    "recorded_attentions",
    "vision_blocks",
]
