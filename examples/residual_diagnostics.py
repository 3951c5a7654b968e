"""Diagnostics for the LayerNorm-site split: what the cloud would need besides the indices to lose nothing.

With only indices crossing an ``ln1``-site split, the cloud computes ``h = z + attn(z)`` with ``z = q(ln1(x))``:
the dequantized LayerNorm output stands in for the block input ``x`` in the residual connection too. Two
single-process simulations tell where the loss comes from:

* `residual_kept_unquantized`: ``x`` itself reaches the cloud, ``h = x + attn(z)`` (not deployable: ``x`` would
  have to be sent as well);
* `mean_scale_restored`: each token's mean and scale of ``x`` (two fp16 numbers per token) are sent beside the
  indices, and the cloud undoes the LayerNorm, ``x_hat = (z - beta) / gamma * scale + mean``,
  ``h = x_hat + attn(z)``. Deployable at `SIDE_BYTES_PER_TOKEN` more bytes per token.

Both patch the functions the model really calls (`models.llava_alignedvq.modeling_alignedvq.edge_forward` and
`models.llava_alignedvq.split.block_from_site`, which `cloud_forward` looks up), for training and evaluation
alike, and need the edge and the cloud to run on the same batch in one process (as training and
`evaluate_vqa` do).
"""

from __future__ import annotations

import contextlib

import torch

from transformers_alignedvq.models.llava_alignedvq import modeling_alignedvq, split

SIDE_BYTES_PER_TOKEN = 4
"""`mean_scale_restored` sends a mean and a scale per token, each as fp16."""


@contextlib.contextmanager
def _patched(edge, cloud):
    original_edge, original_cloud = modeling_alignedvq.edge_forward, split.block_from_site
    modeling_alignedvq.edge_forward, split.block_from_site = edge, cloud
    try:
        yield
    finally:
        modeling_alignedvq.edge_forward, split.block_from_site = original_edge, original_cloud


def _edge_keeping_input(kept: dict):
    """An ``edge_forward`` that also leaves the split block's input ``x`` in ``kept`` for the cloud half."""

    def edge(tower, pixel_values, split_layer, site):
        if site != "ln1":
            raise RuntimeError(f"the residual diagnostics split at ln1 only, not {site!r}")
        kept["x"] = split.edge_forward(tower, pixel_values, split_layer, "input")  # the split block's input
        return split.block_to_site(split.vision_blocks(tower)[split_layer], kept["x"], site)

    return edge


def _block_input(kept: dict, z: torch.Tensor, site: str) -> torch.Tensor:
    x = kept.get("x")
    if site != "ln1" or x is None or x.shape != z.shape:
        raise RuntimeError("residual diagnostics: ln1 site only, with edge and cloud on the same batch")
    return x


def _finish_block(block, residual: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    hidden = residual + split._attention(block, z)
    return hidden + block.mlp(block.layer_norm2(hidden))


@contextlib.contextmanager
def residual_kept_unquantized():
    """The block input ``x`` kept unquantized for the residual connection: ``h = x + attn(q(ln1(x)))``."""
    kept: dict = {}

    def cloud(block, z, site):
        return _finish_block(block, _block_input(kept, z, site), z)

    with _patched(_edge_keeping_input(kept), cloud):
        yield


def restore_mean_scale(norm: torch.nn.LayerNorm, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x`` rebuilt from its LayerNorm output ``z`` and each token's mean and scale (``sqrt(var + eps)``) of ``x``,
    rounded to fp16 as they would travel: exact when ``z = norm(x)``."""
    mean = x.mean(-1, keepdim=True)
    scale = (x.var(-1, unbiased=False, keepdim=True) + norm.eps).sqrt()
    mean, scale = (t.to(torch.float16).to(x.dtype) for t in (mean, scale))
    return (z - norm.bias) / norm.weight * scale + mean


@contextlib.contextmanager
def mean_scale_restored():
    """Each token's mean and scale of ``x`` sent beside the indices; the cloud undoes ``ln1`` with them."""
    kept: dict = {}

    def cloud(block, z, site):
        x = _block_input(kept, z, site)
        return _finish_block(block, restore_mean_scale(block.layer_norm1, z, x), z)

    with _patched(_edge_keeping_input(kept), cloud):
        yield


DIAGNOSTICS = {"residual_kept": residual_kept_unquantized, "mean_scale": mean_scale_restored}
"""Name (as results files record it) -> context manager."""

__all__ = ["DIAGNOSTICS", "SIDE_BYTES_PER_TOKEN", "mean_scale_restored", "residual_kept_unquantized",
           "restore_mean_scale"]
