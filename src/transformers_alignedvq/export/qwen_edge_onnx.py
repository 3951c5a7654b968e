"""Qwen2.5-VL's edge as one ONNX graph with a dynamic patch grid, for `qwen_edge_runtime`.

The edge runs Qwen's ViT up to a window-local site (`Qwen2_5_VLAlignedVQConfig`) and searches the codebook.
Two graphs, by site:

* ``patch``: ``patches (num_patches, C*P*P) -> indices``. The patch embedding is a Conv3d with kernel = stride
  and no bias, i.e. one linear map per patch; a still image fills both temporal slots, so the map is the sum of
  the two temporal kernels, and it is folded into the search tables (`onnx_search.codewords` with ``weight``):
  the graph is the codeword search on raw pixels.
* ``input`` / ``ln1`` / ``mlp`` of a windowed block: ``patches (num_patches, C*P*P)``, ``positions (num_patches,
  2)``, ``padded_from_raster (windows, side²)``, ``key_bias (windows, side²)``, ``raster_from_padded
  (num_patches,)`` -> ``indices``. The windows
  and positions are computed on the device in numpy (`qwen_edge_runtime.window_layout`; its docstring says why);
  the front (patch embedding, rotary embedding, blocks, site) is exported by ``torch.onnx`` with the windows as a
  dynamic batch, using the tower's own modules, and joined to the hand-written search
  (`onnx_search.search_model`).

Indices come out one per patch in raster order, ``(num_patches[, stages])``, as `encode_edge` returns them.
Grouped codebooks (``num_groups > 1``) are not exported. Needs torch, ``onnx``, ``onnxscript`` (the ``export``
extra); the device needs neither.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

from ..models.qwen2_5_vl_alignedvq.configuration_qwen2_5_vl_alignedvq import check_local_site
from ..preprocess_qwen import QwenImagePreprocessing
from ..qwen_edge_runtime import (
    PATCH_INPUTS,
    QWEN_EDGE_CONFIG,
    QWEN_EDGE_FORMAT,
    QWEN_EDGE_MODEL,
    WINDOW_INPUTS,
    window_layout,
)
from ..wire import codebook_fingerprint
from .edge import folded_search
from .onnx_search import _Graph, _model, _stages, codewords, search_model
from .search import SearchConfig

OUTPUT_NAME = "indices"


def still_image_patch_map(tower) -> np.ndarray:
    """The patch embedding of a still image as ``(hidden, C * P * P)`` float64: the Conv3d's temporal kernels
    summed, since every temporal slot holds the same patch."""
    weight = tower.patch_embed.proj.weight.detach().double().cpu()  # (hidden, C, T, P, P)
    if tower.patch_embed.proj.bias is not None:
        raise ValueError("Qwen2.5-VL's patch embedding has no bias; this one has")
    return weight.sum(dim=2).reshape(weight.shape[0], -1).numpy()


def patch_model(tower, search):
    """The ``patch``-site edge: ``patches (num_patches, C*P*P)`` raster order -> ``indices (num_patches[,
    stages])``, the patch embedding folded into the search."""
    weight = still_image_patch_map(tower)
    graph = _Graph("edge/")
    found = codewords(graph, PATCH_INPUTS[0], search, weight=weight)  # (n, stages)
    stages = _stages(search)
    shape = np.array([-1] + ([stages] if stages > 1 else []), np.int64)
    graph.op("Reshape", [found, graph.const(shape, "out_shape")], [OUTPUT_NAME])
    return _model(graph, PATCH_INPUTS[0], ["patches", weight.shape[1]], OUTPUT_NAME,
                  ["patches"] + ([stages] if stages > 1 else []))


class WindowedFront(nn.Module):
    """The tower up to the site on raster-order patches, the windows given as index maps (module docstring);
    returns ``(1, num_patches, hidden)`` site features in raster order. The blocks' own submodules do the work;
    only the attention is rewritten, as one product over padded windows instead of a loop over variable ones."""

    def __init__(self, tower, split_layer: int, site: str):
        super().__init__()
        self.tower = tower
        self.split_layer, self.site = split_layer, site
        self.register_buffer("patch_map", torch.from_numpy(still_image_patch_map(tower)).float(), persistent=False)

    def forward(self, patches, positions, padded_from_raster, key_bias, raster_from_padded):
        hidden = patches @ self.patch_map.T  # (num_patches, hidden)
        rotary = self.tower.rotary_pos_emb(hidden, positions)
        windows = (padded_from_raster, key_bias[:, None, None, :], raster_from_padded)
        for block in self.tower.blocks[: self.split_layer]:
            hidden = self._block(block, hidden, rotary, windows)
        block = self.tower.blocks[self.split_layer]
        if self.site == "ln1":
            hidden = block.norm1(hidden)
        elif self.site == "mlp":
            hidden = self._block(block, hidden, rotary, windows)
        return hidden[None]

    def _block(self, block, hidden, rotary, windows):
        hidden = hidden + self._attention(block.attn, block.norm1(hidden), rotary, windows)
        return hidden + block.mlp(block.norm2(hidden))

    @staticmethod
    def _attention(attn, hidden, rotary, windows):
        gather, bias, scatter = windows
        count, dim = hidden.shape
        query, key, value = attn.qkv(hidden).reshape(count, 3, attn.num_heads, attn.head_dim).unbind(1)
        query, key = apply_rotary_pos_emb_vision(query, key, *rotary)
        # The patches gathered window by window; padding slots repeat a patch, masked out as keys.
        query, key, value = (t.index_select(0, gather.reshape(-1)).reshape(*gather.shape, attn.num_heads, -1)
                             .transpose(1, 2) for t in (query, key, value))  # (windows, heads, slots, head_dim)
        out = torch.softmax((query @ key.transpose(-1, -2)) * attn.scaling + bias, dim=-1) @ value
        out = out.transpose(1, 2).reshape(-1, dim).index_select(0, scatter)
        return attn.proj(out)


def example_inputs(height: int, width: int, side: int, patch_dim: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """The window-model inputs of a random ``height x width``-patch image, as the runtime makes them."""
    layout = window_layout(height, width, side)
    patches = np.random.default_rng(seed).standard_normal((height * width, patch_dim)).astype(np.float32)
    arrays = (patches, layout.positions, layout.padded_from_raster, layout.key_bias, layout.raster_from_padded)
    return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)


def window_model(tower, split_layer: int, site: str, search, side: int):
    """The block-site edge as one ONNX model (the exported `WindowedFront` joined to the search)."""
    import onnx
    from onnx import compose

    patch_dim = tower.patch_embed.in_channels * tower.patch_embed.patch_size**2
    front = WindowedFront(tower, split_layer, site).eval()
    # An image of 2x3 windows, the last row and column cut short: no dimension of the example is 0 or 1, so
    # torch.export keeps every one dynamic.
    example = example_inputs(2 * side - 2, 3 * side - 2, side, patch_dim)
    windows, patches = torch.export.Dim("windows", min=1), torch.export.Dim("num_patches", min=1)
    shapes = ({0: patches}, {0: patches}, {0: windows}, {0: windows}, {0: patches})
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        path = Path(scratch) / "front.onnx"
        program = torch.onnx.export(front, example, input_names=list(WINDOW_INPUTS), output_names=["features"],
                                    dynamic_shapes=shapes, dynamo=True, verbose=False)
        program.save(str(path))
        graph = onnx.load(str(path))
    opset = next(entry.version for entry in graph.opset_import if entry.domain in ("", "ai.onnx"))
    found = search_model(search, tower.config.hidden_size, input_name="features", output_name="batch_indices",
                         opset=opset)
    found.ir_version = graph.ir_version
    merged = compose.merge_models(graph, found, io_map=[("features", "features")])
    squeeze = onnx.helper.make_node("Squeeze", ["batch_indices", "squeeze_axis"], [OUTPUT_NAME])
    merged.graph.initializer.append(onnx.numpy_helper.from_array(np.array([0], np.int64), "squeeze_axis"))
    merged.graph.node.append(squeeze)
    stages = _stages(search)
    merged.graph.output.pop()
    merged.graph.output.append(onnx.helper.make_tensor_value_info(
        OUTPUT_NAME, onnx.TensorProto.INT64, ["num_patches"] + ([stages] if stages > 1 else [])))
    return merged


def export_qwen_edge(model, directory: str | os.PathLike, *, search: SearchConfig | None = None,
                     preprocessing: QwenImagePreprocessing | None = None) -> Path:
    """Write the edge of a `Qwen2_5_VLAlignedVQForConditionalGeneration` to ``directory`` (``qwen_edge.onnx`` +
    ``qwen_edge.json``) for `qwen_edge_runtime.load_qwen_edge`.

    Args:
        search: exact (default) or shortlist codeword search (`SearchConfig`).
        preprocessing: the image processor's settings (`QwenImagePreprocessing.from_image_processor`); default:
            Qwen2-VL's processor defaults with the tower's patch, merge and temporal sizes.
    """
    import onnx

    config, inner = model.config, model.model
    vision, tower = config.vision_config, inner.visual
    check_local_site(vision, config.split_layer, config.split_site)
    preprocessing = preprocessing or QwenImagePreprocessing(
        patch_size=vision.patch_size, merge_size=vision.spatial_merge_size,
        temporal_patch_size=vision.temporal_patch_size)
    if (preprocessing.patch_size, preprocessing.merge_size) != (vision.patch_size, vision.spatial_merge_size):
        raise ValueError(f"the preprocessing's patch/merge sizes {(preprocessing.patch_size, preprocessing.merge_size)}"
                         f" are not the tower's {(vision.patch_size, vision.spatial_merge_size)}")
    finder = folded_search(inner.alignedvq, search or SearchConfig())
    if finder is None:
        raise ValueError("grouped codebooks (num_groups > 1) have no folded search; the Qwen2.5-VL edge does not "
                         "export them")
    finder = finder.cpu().eval()
    side = vision.window_size // vision.spatial_merge_size // vision.patch_size * vision.spatial_merge_size
    was_training = model.training
    model.eval()
    try:
        if config.split_site == "patch":
            graph = patch_model(tower, finder)
        else:
            graph = window_model(tower, config.split_layer, config.split_site, finder, side)
    finally:
        model.train(was_training)
    onnx.checker.check_model(graph)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(directory / QWEN_EDGE_MODEL))
    settings = {
        "format": QWEN_EDGE_FORMAT, "split_site": config.split_site, "split_layer": config.split_layer,
        "window_patches": side, "patch_dim": vision.in_channels * vision.patch_size**2,
        "codebook_size": config.codebook_size, "codes_per_token": config.codes_per_token,
        # The graph holds no codebook tensor to hash on the device; frames must carry the cloud's fingerprint.
        "codebook_fingerprint": codebook_fingerprint(inner.alignedvq.quantizer.codebook).hex(),
        "search": finder.config.to_dict(), "preprocessing": preprocessing.to_dict(),
    }
    (directory / QWEN_EDGE_CONFIG).write_text(json.dumps(settings, indent=2) + "\n")
    return directory


__all__ = ["WindowedFront", "export_qwen_edge", "patch_model", "still_image_patch_map",
           "window_model"]
