"""The codeword search as a hand-built ONNX graph, and the ``patch`` edge with its convolution folded away.

`edge_onnx` used to export `search.CodewordSearch` through `torch.onnx`; the graph that gives is what PyTorch
computes, op for op, and ONNX Runtime runs some of those ops slowly on one thread: ``ArgMin`` over 4,096 scores
per token takes several times as long as ``TopK`` with k = 1, ``addmm`` becomes a ``Gemm`` that copies its bias
first, and the re-rank gathers through reshapes. This module writes the same searches directly with
``onnx.helper``, on a 2-D ``(rows, dim)`` layout:

* exact: ``Gemm(x, -2 Eᵀ, offsets)`` and ``TopK(k=1)``;
* shortlist: ``x @ basisᵀ`` (rank ``r``, with a constant 1 appended that carries the offsets), the product with
  the codebook's rank-``r`` image and ``TopK(candidates)`` in a ``Scan`` over chunks of ``CHUNK_ROWS`` rows (so
  the scores never leave the cache), then the exact re-rank: ``Gather`` of the candidates' rows, one batched
  product, ``ArgMin`` over the few candidates.

Both take the search of `CodewordSearch` (its folded codebook, offsets and, for the shortlist, its basis), so the
ONNX edge chooses the same codewords as the PyTorch one up to fp32 rounding.

**Folding the patch embedding.** At the ``patch`` site the feature is ``z = W p + b``: a linear map (CLIP's patch
convolution) of the token's raw patch ``p`` (3 × 14 × 14 = 588 numbers for LLaVA-1.5), and the class token's
feature is a constant. The search of ``z`` against ``E`` is then a search of ``p`` against ``E W`` with offsets
moved by ``E b``, so `patch_edge_model` needs no convolution at all: the pixels are cut into patches (a reshape
and a transpose), searched in 588 dimensions instead of 1,024, and the class token's index, computed once at
export, is put in front. Exact up to rounding, in fp32, with no int8 front and its calibration.

Export side (numpy, ``onnx``, and torch for reading the edge's tensors); the device runs the result with
onnxruntime alone.
"""

from __future__ import annotations

import numpy as np

OPSET = 17
# The IR version that goes with opset 17: what onnx writes by default is newer than the oldest onnxruntime we
# support (1.20 reads IR <= 10), and nothing here needs more.
IR_VERSION = 8
# Rows the shortlist scores per step: their (64, 4,096) fp32 scores (1 MiB) stay in the L2 cache between the
# product and TopK, where all 577 rows' 9.4 MB would go through memory twice. 64 was the fastest of 48 ... 192
# on a LLaVA-1.5 image (`benchmarks/edge_encode.py`).
CHUNK_ROWS = 64


class _Graph:
    """Nodes and initializers of one graph, with unique names (a prefix keeps merged graphs apart)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.initializers, self._count = prefix, [], [], 0
        self._names: set[str] = set()

    def const(self, array: np.ndarray, name: str) -> str:
        from onnx import numpy_helper

        name = self.prefix + name
        while name in self._names:  # a helper used twice (one search stage after another) names its tables again
            self._count += 1
            name = f"{self.prefix}{name.removeprefix(self.prefix)}_{self._count}"
        self._names.add(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: int | list[str] = 1, **attributes):
        from onnx import helper

        if isinstance(outputs, int):
            self._count += 1
            outputs = [f"{self.prefix}{op_type.lower()}_{self._count}_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, **attributes))
        return outputs[0] if len(outputs) == 1 else outputs


def _affine_search_tables(folded, offsets, weight, bias):
    """Tables to search ``x`` where the feature is ``z = x @ weight.T + bias``: ``(-2 E W)ᵀ`` and the offsets."""
    folded = folded.astype(np.float64)
    table = folded if weight is None else folded @ weight.astype(np.float64)
    moved = offsets.astype(np.float64) - (0.0 if bias is None else 2.0 * folded @ bias.astype(np.float64))
    return (-2.0 * table.T).astype(np.float32), moved.astype(np.float32)


def nearest_codewords(graph: _Graph, rows: str, search, *, weight=None, bias=None) -> str:
    """Add the search of ``search`` (a `CodewordSearch`) to ``graph``: ``rows`` ``(n, dim)`` float -> ``(n, 1)``
    int64. ``weight`` ``(features, dim)`` and ``bias`` ``(features,)``: the rows are not the features yet but
    ``z = rows @ weight.T + bias`` is (numpy arrays; ``None`` for the identity)."""
    folded, offsets = search.folded.double().numpy(), search.offsets.double().numpy()
    table_t, table_offsets = _affine_search_tables(folded, offsets, weight, bias)
    if search.config.method == "exact":
        scores = graph.op("Gemm", [rows, graph.const(table_t, "table_t"), graph.const(table_offsets, "offsets")])
        return graph.op("TopK", [scores, graph.const(np.array([1], np.int64), "one")], 2, axis=-1, largest=0,
                        sorted=0)[1]
    last = graph.const(np.array([-1], np.int64), "last")
    basis = search.basis.double().numpy()  # (r, features): CodewordSearch's own, so both pick the same shortlist
    low = folded @ basis.T  # (K, r)
    projection = basis if weight is None else basis @ weight.astype(np.float64)
    low_offsets = offsets - (0.0 if bias is None else 2.0 * low @ (basis @ bias.astype(np.float64)))
    count = min(search.config.candidates, folded.shape[0])
    # The offsets ride in the product as one more dimension whose coordinate is always 1 (the small first
    # product's bias puts it there): a Gemm with the offsets as its bias would first copy them into every row of
    # the (n, K) result, one more pass over the largest tensor of the graph.
    rank = projection.shape[0]
    lift = np.concatenate([projection.T, np.zeros((projection.shape[1], 1))], axis=1)
    unit = np.zeros(rank + 1)
    unit[-1] = 1.0
    proj = graph.op("Gemm", [rows, graph.const(lift.astype(np.float32), "basis_t"), graph.const(unit.astype(np.float32),
                                                                                                  "unit")])
    low_table = np.concatenate([-2.0 * low.T, low_offsets[None]], axis=0)  # (r + 1, K)
    candidates = _shortlist_in_chunks(graph, proj, low_table.astype(np.float32), count)  # (n, c)
    # The exact re-rank: rows of -2 E W for the candidates only, one small product per row.
    picked = graph.op("Gather", [graph.const(np.ascontiguousarray(table_t.T), "table"), candidates], axis=0)
    dots = graph.op("MatMul", [picked, graph.op("Unsqueeze", [rows, last])])  # (n, c, 1)
    exact = graph.op("Add", [graph.op("Squeeze", [dots, last]),
                             graph.op("Gather", [graph.const(table_offsets, "table_offsets"), candidates], axis=0)])
    best = graph.op("ArgMin", [exact], axis=-1, keepdims=1)
    return graph.op("GatherElements", [candidates, best], axis=-1)


def _shortlist_in_chunks(graph: _Graph, proj: str, low_table: np.ndarray, count: int) -> str:
    """The ``count`` lowest approximate scores' indices of every row, ``(n, count)``, computed ``CHUNK_ROWS`` rows
    at a time by a ``Scan``: the rows are padded to a multiple of the chunk, and the padding cut off again."""
    from onnx import TensorProto, helper

    chunk, width = graph.const(np.array([CHUNK_ROWS], np.int64), "chunk"), low_table.shape[0]
    table, k = graph.const(low_table, "low_t"), graph.const(np.array([count], np.int64), "count")
    rows = graph.op("Shape", [proj], end=1)
    pad = graph.op("Mod", [graph.op("Sub", [chunk, graph.op("Mod", [rows, chunk])]), chunk])
    zero = graph.const(np.array([0], np.int64), "zero")
    padded = graph.op("Pad", [proj, graph.op("Concat", [zero, zero, pad, zero], axis=0)])
    blocks = graph.op("Reshape", [padded, graph.const(np.array([-1, CHUNK_ROWS, width], np.int64), "blocks")])
    body = helper.make_graph(
        [helper.make_node("MatMul", ["block", table], ["scores"]),
         helper.make_node("TopK", ["scores", k], ["values", "found"], axis=-1, largest=0, sorted=0)],
        "shortlist_chunk", [helper.make_tensor_value_info("block", TensorProto.FLOAT, [CHUNK_ROWS, width])],
        [helper.make_tensor_value_info("found", TensorProto.INT64, [CHUNK_ROWS, count])])
    found = graph.op("Scan", [blocks], body=body, num_scan_inputs=1)
    flat = graph.op("Reshape", [found, graph.const(np.array([-1, count], np.int64), "found_shape")])
    return graph.op("Slice", [flat, zero, rows, zero])


def _model(graph: _Graph, input_name: str, input_shape: list, output_name: str, output_shape: list,
           opset: int = OPSET):
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)]
    outputs = [helper.make_tensor_value_info(output_name, TensorProto.INT64, output_shape)]
    body = helper.make_graph(graph.nodes, "alignedvq_edge", inputs, outputs, graph.initializers)
    return helper.make_model(body, opset_imports=[helper.make_opsetid("", opset)], ir_version=IR_VERSION)


def search_model(search, dim: int, *, input_name: str = "features", output_name: str = "indices",
                 opset: int = OPSET):
    """The search alone as an ONNX model: ``features (batch, tokens, dim)`` -> ``indices (batch, tokens)``, or
    ``(batch, tokens, stages)`` for a residual search (``opset`` >= 17; the ops used mean the same in every later
    one)."""
    graph = _Graph("search/")
    rows = graph.op("Reshape", [input_name, graph.const(np.array([-1, dim], np.int64), "rows_shape")])
    found = codewords(graph, rows, search)  # (n, stages)
    shape = graph.op("Shape", [input_name], end=2)
    stages = _stages(search)
    if stages > 1:
        shape = graph.op("Concat", [shape, graph.const(np.array([stages], np.int64), "stages")], axis=0)
    graph.op("Reshape", [found, shape], [output_name])
    out = ["batch", "tokens"] + ([stages] if stages > 1 else [])
    return _model(graph, input_name, ["batch", "tokens", dim], output_name, out, opset)


def _stages(search) -> int:
    return 1 + len(getattr(search, "stages", ()))


def codewords(graph: _Graph, rows: str, search, *, weight=None, bias=None) -> str:
    """`nearest_codewords` for a `CodewordSearch`, or every stage of a `ResidualCodewordSearch`: ``(n, stages)``."""
    if not hasattr(search, "stages"):
        return nearest_codewords(graph, rows, search, weight=weight, bias=bias)
    found = [nearest_codewords(graph, rows, search.first, weight=weight, bias=bias)]  # (n, 1) each
    prev = _gathered(graph, graph.const(search.first_codebook.numpy(), "words_0"), found[0])
    for number, stage in enumerate(search.stages, start=1):
        book = graph.const(stage.codebook.numpy(), f"stage{number}_codebook")  # centred (K, d), used thrice
        found.append(_residual_stage(graph, rows, stage, book, prev, number, weight, bias))
        chosen = _gathered(graph, book, found[-1])
        prev = graph.op("Add", [prev, graph.op("Add", [chosen, graph.const(stage.center.numpy(),
                                                                           f"stage{number}_center")])])
    return graph.op("Concat", found, axis=1)


def _gathered(graph: _Graph, table: str, index: str) -> str:
    """Rows ``table[index[:, 0]]``, ``(n, d)``, of a graph constant ``table`` ``(K, d)``."""
    flat = graph.op("Squeeze", [index, graph.const(np.array([1], np.int64), "index_axis")])
    return graph.op("Gather", [table, flat], axis=0)


def _residual_stage(graph: _Graph, rows: str, stage, book: str, prev: str, number: int, weight, bias) -> str:
    """One `search.ResidualStage` on ``rows`` ``(n, dim)`` with ``prev`` ``(n, d)`` -> ``(n, 1)`` int64; ``book``
    names the stage's centred codebook in the graph; the rows' features are ``rows @ weight.T + bias`` (``None``:
    the rows themselves)."""
    def const(array, name):
        return graph.const(np.ascontiguousarray(array, dtype=np.float32), f"stage{number}_{name}")

    table_t, offsets = _affine_search_tables(stage.folded.double().numpy(), stage.offsets.double().numpy(),
                                             weight, bias)  # (-2 E M W)ᵀ and the offsets moved by W's bias
    if stage.config.method == "exact":
        scores = graph.op("Gemm", [rows, const(table_t, "table_t"), const(offsets, "offsets")])
        cross = graph.op("Gemm", [prev, book], alpha=2.0, transB=1)  # 2 e_k . prev, from the (K, d) codebook
        return graph.op("TopK", [graph.op("Add", [scores, cross]), graph.const(np.array([1], np.int64), "one")],
                        2, axis=-1, largest=0, sorted=0)[1]
    # The shortlist: B r = (B M) z + B c - B prev, with a last coordinate 1 that carries the codeword norms.
    projection = stage.projection.double().numpy()
    projection_shift = 0.0
    if weight is not None:
        projection_shift = 0.0 if bias is None else projection @ bias.astype(np.float64)
        projection = projection @ weight.astype(np.float64)
    lift = np.concatenate([projection.T, np.zeros((projection.shape[1], 1))], axis=1)
    unit = np.append(stage.projection_bias.double().numpy() + projection_shift, 1.0)
    basis = np.concatenate([stage.basis.double().numpy().T, np.zeros((stage.basis.shape[1], 1))], axis=1)
    low = graph.op("Sub", [graph.op("Gemm", [rows, const(lift, "basis_t"), const(unit, "unit")]),
                           graph.op("MatMul", [prev, const(basis, "prev_basis_t")])])  # (n, rank + 1)
    low_table = np.concatenate([-2.0 * stage.low.double().numpy().T, stage.norms.double().numpy()[None]], axis=0)
    count = min(stage.config.candidates, stage.codebook.shape[0])
    candidates = _shortlist_in_chunks(graph, low, low_table.astype(np.float32), count)  # (n, c)
    # Exact distances of the candidates: their rows of -2 E M and of E, one small product each.
    last = graph.const(np.array([-1], np.int64), "last")

    def dot(table: str, vector: str) -> str:
        picked = graph.op("Gather", [table, candidates], axis=0)  # (n, c, width)
        return graph.op("Squeeze", [graph.op("MatMul", [picked, graph.op("Unsqueeze", [vector, last])]), last])

    cross = graph.op("Mul", [dot(book, prev), graph.const(np.array(2.0, np.float32), "two")])
    exact = graph.op("Add", [dot(const(np.ascontiguousarray(table_t.T), "table"), rows), cross])
    exact = graph.op("Add", [exact, graph.op("Gather", [const(offsets, "table_offsets"), candidates], axis=0)])
    return graph.op("GatherElements", [candidates, graph.op("ArgMin", [exact], axis=-1, keepdims=1)], axis=-1)


def foldable_patch_embedding(edge) -> bool:
    """Whether ``edge``'s ``patch`` site is a plain linear map of non-overlapping patches (CLIP's and SigLIP's
    patch convolutions are) with a folded search (one codebook, or residual stages), so `patch_edge_model`
    applies."""
    if edge.settings["split_site"] != "patch" or edge.search is None:
        return False
    conv = edge.embeddings.patch_embedding
    size = edge.vision_config.patch_size
    return (tuple(conv.kernel_size) == tuple(conv.stride) == (size, size) and conv.groups == 1
            and tuple(conv.dilation) == (1, 1) and conv.padding in ((0, 0), "valid"))


def patch_edge_model(edge, *, input_name: str = "pixel_values", output_name: str = "indices"):
    """The whole ``patch``-site edge, ``pixel_values (batch, 3, size, size)`` -> ``indices (batch, tokens)``
    (``(batch, tokens, stages)`` for residual VQ), with the patch convolution folded into the search (module
    docstring). Needs `foldable_patch_embedding`."""
    import torch

    if not foldable_patch_embedding(edge):
        raise ValueError("the patch convolution folds only at the patch site, with a folded search")
    vision, conv = edge.vision_config, edge.embeddings.patch_embedding
    channels, size, patch = vision.num_channels, vision.image_size, vision.patch_size
    side, stages = size // patch, _stages(edge.search)
    weight = conv.weight.detach().double().reshape(conv.out_channels, -1).numpy()  # (features, c*kh*kw)
    bias = None if conv.bias is None else conv.bias.detach().double().numpy()
    graph = _Graph("edge/")
    cut = graph.op("Reshape", [input_name, graph.const(np.array([-1, channels, side, patch, side, patch], np.int64),
                                                       "cut_shape")])
    patches = graph.op("Transpose", [cut], perm=[0, 2, 4, 1, 3, 5])  # (batch, row, col, c, kh, kw): conv order
    rows = graph.op("Reshape", [patches, graph.const(np.array([-1, weight.shape[1]], np.int64), "rows_shape")])
    found = codewords(graph, rows, edge.search, weight=weight, bias=bias)  # (n, stages)
    per_image = graph.op("Reshape", [found, graph.const(np.array([-1, side * side, stages], np.int64), "grid_shape")])
    cls = getattr(edge.embeddings, "class_embedding", None)
    tokens = side * side + (cls is not None)
    if cls is not None:
        with torch.no_grad():  # a constant feature: its indices are found once, here, by the PyTorch search itself
            cls_index = edge.search(cls.detach().float()[None, None]).reshape(1, 1, stages).numpy().astype(np.int64)
        shape = graph.op("Concat", [graph.op("Shape", [per_image], end=1),
                                    graph.const(np.array([1, stages], np.int64), "cls_shape")], axis=0)
        cls_column = graph.op("Expand", [graph.const(cls_index, "cls_index"), shape])
        per_image = graph.op("Concat", [cls_column, per_image], axis=1)
    out_shape = np.array([-1, tokens] + ([stages] if stages > 1 else []), np.int64)
    graph.op("Reshape", [per_image, graph.const(out_shape, "out_shape")], [output_name])
    dims = ["batch", tokens] + ([stages] if stages > 1 else [])
    return _model(graph, input_name, ["batch", channels, size, size], output_name, dims)


__all__ = ["codewords", "foldable_patch_embedding", "nearest_codewords", "patch_edge_model", "search_model"]
