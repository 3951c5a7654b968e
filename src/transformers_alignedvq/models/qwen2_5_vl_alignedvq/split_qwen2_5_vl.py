"""Running Qwen2.5-VL's vision tower in two halves around a window-local split site.

The tower (`Qwen2_5_VisionTransformerPretrainedModel`) embeds each patch with a linear map (``patch_embed``, no
bias, no absolute positions, no pre-norm), runs pre-norm blocks ``h = x + attn(norm1(x)); out = h +
mlp(norm2(h))`` with 2-D rotary positions inside every attention and attention restricted to windows of
``window_size`` pixels except in ``fullatt_block_indexes``, then the merger (RMSNorm + MLP over each 2x2 merge
unit of patches).

Three orders of a batch's patch tokens appear here:

* *processor order*: the rows of ``pixel_values`` as the image processor emits them (2x2 merge units row by
  row, the four patches of a unit row by row), image after image;
* *window order*: the tower's internal order, merge units regrouped window by window (Transformers'
  ``window_index``); windowed attention runs over consecutive tokens in this order;
* *raster order*: **the wire order**. Image after image (in ``image_grid_thw`` order), each image's patches
  row by row: token ``(y, x)`` of an image with grid ``(1, h, w)`` is row ``y * w + x`` of that image's block.
  It depends on the grid alone (not on ``window_size``), and neighbours in the image are neighbours in the grid.

The edge computes in processor and window order and hands over site features in raster order; the cloud maps
them back to window order, recomputes the windows and rotary positions from ``image_grid_thw`` with
Transformers' own functions, runs the rest of the tower and the merger, and returns the merged tokens in the
order the language model reads them (merge units row by row), as the stock tower does. Each function takes the
batch's `token_layout`, computed once per forward pass and shared by its steps (edge, cloud, merger).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils.generic import get_max_seqlen
from transformers.vision_utils import get_vision_attention_seqlens, get_vision_position_ids, get_vision_window_index


@dataclass(frozen=True)
class TokenLayout:
    """Index maps and attention boundaries for a batch of images. ``a_from_b`` gathers order ``a`` from order
    ``b``: ``x_a = x_b[a_from_b]``.

    Attributes:
        raster_from_processor, window_from_processor, window_from_raster, raster_from_window: ``(num_patches,)``.
        positions: ``(num_patches, 2)`` rotary (row, column) of each token, in window order.
        unit_order: ``(num_patches // 4,)`` merge units from window order back to the language model's order.
        cu_seqlens, cu_window_seqlens: cumulative token boundaries of whole images and of windows (window order).
        max_seqlen, max_window_seqlen: the longest of each, for flash attention (``None`` otherwise).
    """

    raster_from_processor: torch.Tensor
    window_from_processor: torch.Tensor
    window_from_raster: torch.Tensor
    raster_from_window: torch.Tensor
    positions: torch.Tensor
    unit_order: torch.Tensor
    cu_seqlens: torch.Tensor
    cu_window_seqlens: torch.Tensor
    max_seqlen: int | None
    max_window_seqlen: int | None


def _raster_of_processor(grid_thw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Raster index of each processor-order token, from its (row, column) and its image's grid."""
    frames, offsets, widths, start = [], [], [], 0
    for t, h, w in grid_thw.tolist():
        frames.append(torch.arange(t).repeat_interleave(h * w) * (h * w))
        offsets.append(torch.full((t * h * w,), start))
        widths.append(torch.full((t * h * w,), w))
        start += t * h * w
    positions = positions.cpu()
    return torch.cat(offsets) + torch.cat(frames) + positions[:, 0] * torch.cat(widths) + positions[:, 1]


def token_layout(tower: nn.Module, grid_thw: torch.Tensor) -> TokenLayout:
    """The layout of images of ``grid_thw`` ``(num_images, 3)`` in ``tower``, computed as the stock forward
    computes it (Transformers' ``get_vision_*`` functions), so both ends agree on one release."""
    grid_thw = grid_thw.cpu()
    merge = tower.spatial_merge_size
    positions = get_vision_position_ids(grid_thw, merge)
    cu_seqlens, max_seqlen = get_vision_attention_seqlens(grid_thw, tower.config)
    window_index, cu_window_seqlens = get_vision_window_index(
        grid_thw, spatial_merge_size=merge, window_size=tower.window_size, patch_size=tower.patch_size
    )
    unit = merge * merge
    window_from_processor = (window_index[:, None] * unit + torch.arange(unit)).flatten()
    raster_of_processor = _raster_of_processor(grid_thw, positions)
    window_from_raster = raster_of_processor[window_from_processor]
    return TokenLayout(
        raster_from_processor=torch.argsort(raster_of_processor),
        window_from_processor=window_from_processor,
        window_from_raster=window_from_raster,
        raster_from_window=torch.argsort(window_from_raster),
        positions=positions[window_from_processor],
        unit_order=torch.argsort(window_index),
        cu_seqlens=cu_seqlens,
        cu_window_seqlens=cu_window_seqlens,
        max_seqlen=max_seqlen,
        max_window_seqlen=get_max_seqlen(cu_window_seqlens, tower.config, kwarg_name="max_window_seqlen"),
    )


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x[index.to(x.device)]


def _attention_kwargs(tower: nn.Module, layout: TokenLayout, block_index: int, position_embeddings) -> dict:
    full = block_index in tower.fullatt_block_indexes
    device = position_embeddings[0].device
    return {
        "cu_seqlens": (layout.cu_seqlens if full else layout.cu_window_seqlens).to(device),
        "max_seqlen": layout.max_seqlen if full else layout.max_window_seqlen,
        "position_embeddings": position_embeddings,
    }


def _position_embeddings(tower: nn.Module, hidden: torch.Tensor, layout: TokenLayout):
    """Rotary ``(cos, sin)`` per token in window order (the stock forward permutes them the same way)."""
    return tower.rotary_pos_emb(hidden, layout.positions.to(hidden.device))


def _run_blocks(tower, hidden, layout, position_embeddings, start: int, stop: int, wanted=(), out=None):
    """Blocks ``start .. stop - 1`` on window-order ``hidden``; hidden state ``i`` (block ``i - 1``'s output)
    is put into ``out`` in raster order for each ``i`` in ``wanted``."""
    for index in range(start, stop):
        hidden = tower.blocks[index](hidden, **_attention_kwargs(tower, layout, index, position_embeddings))
        if out is not None and index + 1 in wanted:
            out[index + 1] = _gather(hidden, layout.raster_from_window)
    return hidden


def edge_forward(tower: nn.Module, pixel_values: torch.Tensor, layout: TokenLayout, split_layer: int,
                 site: str) -> torch.Tensor:
    """Processor-order patches ``(num_patches, channels * temporal * patch * patch)`` -> site features
    ``(num_patches, hidden)`` in raster order. The edge needs the grid's `token_layout` for the windows and
    positions only."""
    hidden = tower.patch_embed(pixel_values)
    if site == "patch":
        return _gather(hidden, layout.raster_from_processor)
    hidden = _gather(hidden, layout.window_from_processor)
    position_embeddings = _position_embeddings(tower, hidden, layout)
    hidden = _run_blocks(tower, hidden, layout, position_embeddings, 0, split_layer)
    if site == "ln1":
        hidden = tower.blocks[split_layer].norm1(hidden)
    elif site == "mlp":
        hidden = _run_blocks(tower, hidden, layout, position_embeddings, split_layer, split_layer + 1)
    return _gather(hidden, layout.raster_from_window)


def cloud_start(split_layer: int, site: str) -> int:
    """The first hidden state the cloud computes: the recovered features themselves for ``patch`` (state 0) and
    ``input`` (state ``split_layer``), else the split block's output. The edge's states are those before it."""
    return 0 if site == "patch" else split_layer + int(site != "input")


def edge_hidden_states(tower: nn.Module, pixel_values: torch.Tensor, layout: TokenLayout,
                       count: int) -> list[torch.Tensor]:
    """Hidden states ``0 .. count - 1`` (the patch embedding, then blocks' outputs) as the edge computes them,
    before quantization, in raster order: for the tower's per-layer outputs, which the cloud alone cannot give."""
    if count == 0:
        return []
    hidden = _gather(tower.patch_embed(pixel_values), layout.window_from_processor)
    out = {0: _gather(hidden, layout.raster_from_window)}
    _run_blocks(tower, hidden, layout, _position_embeddings(tower, hidden, layout), 0, count - 1, range(count), out)
    return [out[index] for index in range(count)]


@contextmanager
def recorded_attentions(tower: nn.Module, layout: TokenLayout, enabled: bool = True):
    """Collect, in raster order, what each attention module that runs inside the ``with`` body outputs, in layer
    order: what the stock tower records as its ``attentions`` (the module's output, there in window order)."""
    outputs: list = []
    if not enabled:
        yield outputs
        return
    order = layout.raster_from_window
    hooks = [block.attn.register_forward_hook(lambda module, args, out: outputs.append(_gather(out, order)))
             for block in tower.blocks]
    try:
        yield outputs
    finally:
        for hook in hooks:
            hook.remove()


def cloud_forward(tower: nn.Module, z: torch.Tensor, layout: TokenLayout, split_layer: int, site: str,
                  wanted: list[int]) -> dict[int, torch.Tensor]:
    """Recovered raster-order site features ``z`` -> ``{hidden_state_index: (num_patches, hidden)}`` in raster
    order for each index in ``wanted`` (all after the split; hidden state ``i`` is block ``i - 1``'s output).
    At ``ln1`` the recovered features stand in for the residual stream too, as in every family."""
    hidden = _gather(z, layout.window_from_raster)
    position_embeddings = _position_embeddings(tower, hidden, layout)
    start = cloud_start(split_layer, site)
    if site == "ln1":
        block = tower.blocks[split_layer]
        hidden = hidden + block.attn(hidden, **_attention_kwargs(tower, layout, split_layer, position_embeddings))
        hidden = hidden + block.mlp(block.norm2(hidden))
    out: dict[int, torch.Tensor] = {}
    if start in wanted:
        out[start] = _gather(hidden, layout.raster_from_window)
    _run_blocks(tower, hidden, layout, position_embeddings, start, max(wanted), wanted, out)
    return out


def merge(tower: nn.Module, hidden: torch.Tensor, layout: TokenLayout) -> torch.Tensor:
    """The merger on the last block's raster-order output: ``(num_patches // 4, out_hidden_size)`` tokens in
    the language model's order. Run in window order and then reordered, exactly as the stock tower does."""
    merged = tower.merger(_gather(hidden, layout.window_from_raster))
    return _gather(merged, layout.unit_order)


__all__ = [
    "TokenLayout",
    "cloud_forward",
    "cloud_start",
    "edge_forward",
    "edge_hidden_states",
    "merge",
    "recorded_attentions",
    "token_layout",
]
