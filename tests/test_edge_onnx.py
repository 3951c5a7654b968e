"""The edge as ONNX (fp32 and int8) and with `torch.export`, and the shortlist search."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.conftest import IMAGE_SIZE, NUM_PATCHES, tiny_alignedvq
from transformers_alignedvq.edge_runtime import EDGE_ONNX_NAME, load_edge_runtime
from transformers_alignedvq.export.search import CodewordSearch, SearchConfig, fold_codebook

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")
from transformers_alignedvq.export.edge_onnx import export_onnx  # noqa: E402


def _pixels(seed: int, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("site,layer,method", [("patch", 0, "shortlist"), ("input", 0, "exact"), ("ln1", 0, "shortlist"),
                                               ("mlp", 1, "exact")])
def test_fp32_onnx_edge_gives_the_pytorch_edges_indices(tmp_path, site, layer, method):
    model = tiny_alignedvq(split_site=site, split_layer=layer, codebook_size=32)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.3)
    edge = model.edge_encoder().refresh_search(SearchConfig(method, rank=8, candidates=4))
    path = export_onnx(edge, tmp_path / "edge.onnx")
    session = _session(path)
    for batch in (1, 3):  # any batch size
        pixels = _pixels(batch, batch)
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == (batch, NUM_PATCHES + 1)
        assert np.array_equal(got, edge(pixels).numpy())
    if method == "exact":
        assert torch.equal(edge(pixels), model.encode_edge(pixels))


def test_residual_grouped_edge_exports_for_one_image_at_a_time(tmp_path):
    model = tiny_alignedvq(num_codebooks=2, num_groups=2)
    edge = model.edge_encoder()
    path = export_onnx(edge, tmp_path / EDGE_ONNX_NAME)
    assert _session(path).get_inputs()[0].shape[0] == 1
    edge.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "edge_config.json").read_text())
    config["onnx"] = {"file": EDGE_ONNX_NAME, "int8": False}
    (tmp_path / "edge_config.json").write_text(json.dumps(config))
    runtime = load_edge_runtime(tmp_path, backend="onnx")
    pixels = _pixels(0)
    assert np.array_equal(runtime.encode(pixels.numpy()), edge(pixels).numpy())  # looped image by image


def test_int8_onnx_edge_is_calibrated_and_close_to_fp32(tmp_path):
    model = tiny_alignedvq(split_site="mlp", split_layer=1, codebook_size=32)
    edge = model.edge_encoder()
    calibration = [_pixels(seed, 4).numpy() for seed in range(8)]
    path = export_onnx(edge, tmp_path / "edge.onnx", int8=True, calibration=calibration)
    ops = {node.op_type for node in __import__("onnx").load(str(path)).graph.node}
    assert {"QLinearConv", "QLinearMatMul"} & ops, ops  # integer kernels in the front
    pixels = _pixels(99, 8)
    got = _session(path).run(None, {"pixel_values": pixels.numpy()})[0]
    assert (got == edge(pixels).numpy()).mean() > 0.8  # int8 moves a few features across codeword borders
    with pytest.raises(ValueError, match="calibration"):
        export_onnx(edge, tmp_path / "x.onnx", int8=True)


def test_torch_export_of_the_edge():
    edge = tiny_alignedvq(split_site="input").edge_encoder().refresh_search(SearchConfig("shortlist", 8, 4))
    pixels = _pixels(1)
    program = torch.export.export(edge, (pixels,))
    assert torch.equal(program.module()(pixels), edge(pixels))


def test_shortlist_search_is_exact_when_the_codebook_fits_its_rank():
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(256, 6, generator=generator) @ torch.randn(6, 48, generator=generator)  # rank 6
    weight = torch.eye(48) + 0.1 * torch.randn(48, 48, generator=generator)
    bias = torch.randn(48, generator=generator)
    folded, offsets = fold_codebook(codebook, weight, bias)
    features = torch.randn(500, 48, generator=generator)
    reference = torch.cdist((features @ weight.T + bias).double(), codebook.double()).argmin(-1)
    assert torch.equal(CodewordSearch(folded, offsets)(features), reference)
    # the folded codebook E M has rank 6 too: a rank-8 first pass scores exactly, one candidate is enough
    assert torch.equal(CodewordSearch(folded, offsets, SearchConfig("shortlist", rank=8, candidates=1))(features), reference)
    # a rank-2 first pass is only approximate: the exact re-ranking of candidates recovers the answer
    rough = CodewordSearch(folded, offsets, SearchConfig("shortlist", rank=2, candidates=1))(features)
    reranked = CodewordSearch(folded, offsets, SearchConfig("shortlist", rank=2, candidates=64))(features)
    assert (rough == reference).float().mean() < 0.9 < (reranked == reference).float().mean()
    with pytest.raises(ValueError, match="search method"):
        SearchConfig("nearest")


@pytest.mark.parametrize("method", ["exact", "shortlist"])
def test_patch_site_folds_its_convolution_into_the_codebook(tmp_path, method):
    import onnx

    from transformers_alignedvq.export.edge_onnx import quantizes_front

    model = tiny_alignedvq(split_site="patch", codebook_size=32)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.3)
    edge = model.edge_encoder().refresh_search(SearchConfig(method, rank=8, candidates=4))
    # SigLIP's patch convolution has a bias, CLIP's has none: fold one with a bias (the PyTorch edge uses it too)
    old = edge.embeddings.patch_embedding
    biased = torch.nn.Conv2d(old.in_channels, old.out_channels, old.kernel_size, old.stride, bias=True)
    with torch.no_grad():
        biased.weight.copy_(old.weight)
        biased.bias.copy_(torch.randn(old.out_channels, generator=torch.Generator().manual_seed(3)))
    edge.embeddings.patch_embedding = biased
    calibration = [_pixels(seed, 2).numpy() for seed in range(2)]
    path = export_onnx(edge, tmp_path / "edge.onnx", int8=True, calibration=calibration)
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert not ops & {"Conv", "QLinearConv", "ConvInteger"}, ops  # no front: nothing left to run, or quantize
    session = _session(path)
    for batch in (1, 3):
        pixels = _pixels(10 + batch, batch)
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == (batch, NUM_PATCHES + 1)
        assert np.array_equal(got, edge(pixels).numpy())
    # the folder's config says so (export_onnx_folder records int8 only where a front was quantized)
    assert not quantizes_front(edge, True)
    assert quantizes_front(tiny_alignedvq(split_site="input").edge_encoder(), True)


@pytest.mark.parametrize("site,method", [("patch", "exact"), ("patch", "shortlist"), ("input", "exact"),
                                         ("ln1", "shortlist")])
def test_residual_edge_folds_every_stage(tmp_path, site, method):
    """Residual VQ's stages search folded tables in PyTorch and in ONNX (any batch), with the same indices as
    the model's own residual search (exact; a shortlist as wide as the codebook is exact too)."""
    model = tiny_alignedvq(split_site=site, codebook_size=32, num_codebooks=3)
    with torch.no_grad():
        model.model.alignedvq.dlp_in.gate.fill_(0.3)
    # k-means codebooks, as after `init_codebook`: random later stages lie far from the residuals they code, and
    # their near-ties then break differently under fp32 rounding of different (equivalent) formulas
    model.init_codebook([_pixels(seed, 4) for seed in range(8)], iters=5)
    wide = SearchConfig(method, rank=8, candidates=32 if method == "shortlist" else 8)
    edge = model.edge_encoder().refresh_search(wide)
    pixels = _pixels(5)
    assert torch.equal(edge(pixels), model.encode_edge(pixels))
    edge.refresh_search(SearchConfig(method, rank=4, candidates=3))  # a real shortlist: ONNX == PyTorch
    session = _session(export_onnx(edge, tmp_path / "edge.onnx"))
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 3):
        pixels = _pixels(20 + batch, batch)
        got = session.run(None, {"pixel_values": pixels.numpy()})[0]
        assert got.shape == (batch, NUM_PATCHES + 1, 3)
        assert np.array_equal(got, edge(pixels).numpy())


def test_residual_stage_search_matches_the_quantizer_on_many_features():
    from transformers_alignedvq.export.search import ResidualCodewordSearch
    from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayer

    torch.manual_seed(0)
    layer = AlignedVQLayer(24, 64, num_codebooks=3, use_dlp=True)
    features = torch.randn(3000, 24) * 3 + 1
    layer.init_codebook(layer.pre_quantization(features).detach(), iters=5)
    weight, bias = layer._pre_quantization_affine()
    search = ResidualCodewordSearch(layer.quantizer.codebook[:, 0].detach(), weight.detach(), bias.detach())
    assert torch.equal(search(features.reshape(100, 30, 24)), layer.encode(features).reshape(100, 30, 3))
