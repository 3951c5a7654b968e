"""The LayerNorm-site diagnostics of examples/residual_diagnostics.py reach the code the model runs: with a
lossless quantizer they turn the ``ln1`` split (whose dequantized LayerNorm output replaces the residual stream)
back into the stock LLaVA, on the pixel path and on the indices path alike, and leave nothing patched behind."""

import sys
from pathlib import Path

import pytest
import torch

import transformers_alignedvq as tav
from tests.conftest import prompt_ids, tiny_llava

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
try:
    import paper_report
    import residual_diagnostics as diag
finally:
    sys.path.pop(0)


def llava_with_trained_looking_norms():
    """The tiny LLaVA with its vision LayerNorms' gains and biases drawn away from 1 and 0: at their initial
    values the pre-LayerNorm makes block 0's input already normalized, and ``ln1`` (nearly) the identity."""
    llava = tiny_llava()
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in llava.model.vision_tower.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.5 * torch.randn(module.bias.shape, generator=generator))
    return llava


def lossless_ln1_split(pixels, split_layer: int):
    """An ``ln1`` split whose codebook holds every site feature of ``pixels`` exactly (2 x 17 tokens)."""
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(
        llava_with_trained_looking_norms(), split_site="ln1", split_layer=split_layer, codebook_size=34
    ).eval()
    with torch.no_grad():
        model.model.alignedvq.quantizer.codebook[0, 0] = model.model.edge_features(pixels).reshape(-1, 32)
    return model


@pytest.mark.parametrize("name", sorted(diag.DIAGNOSTICS))
@pytest.mark.parametrize("split_layer", [0, 1])
def test_a_diagnostic_turns_a_lossless_ln1_split_into_llava(pixels, name, split_layer):
    model, reference = lossless_ln1_split(pixels, split_layer), llava_with_trained_looking_norms()
    ids = prompt_ids()
    with torch.no_grad():
        expected = reference(input_ids=ids, pixel_values=pixels).logits
        plain = model(input_ids=ids, pixel_values=pixels).logits
        with diag.DIAGNOSTICS[name]():
            from_pixels = model(input_ids=ids, pixel_values=pixels).logits
            from_indices = model(input_ids=ids, image_indices=model.encode_edge(pixels)).logits
        after = model(input_ids=ids, pixel_values=pixels).logits
    # only indices crossing: ln1(x) stands in for x in the residual, so even a lossless codebook changes the output
    assert (plain - expected).abs().max() > 1e-3
    torch.testing.assert_close(from_pixels, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(from_indices, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, plain)  # unpatched on leaving


def test_restore_mean_scale_inverts_the_layernorm_up_to_fp16_statistics():
    torch.manual_seed(0)
    norm = torch.nn.LayerNorm(32)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.normal_()
    x = 3 * torch.randn(2, 5, 32) + torch.randn(2, 5, 1) * 4
    restored = diag.restore_mean_scale(norm, norm(x), x)
    torch.testing.assert_close(restored, x, atol=1e-2, rtol=1e-2)  # mean and scale travel as fp16
    assert (restored - x).abs().max() > 0  # ... and are rounded like it


def test_the_diagnostics_refuse_other_sites_and_a_cloud_without_its_edge(pixels):
    model = tav.LlavaAlignedVQForConditionalGeneration.from_llava(tiny_llava(), split_site="attn", codebook_size=8)
    with diag.residual_kept_unquantized(), pytest.raises(RuntimeError, match="ln1 only"):
        model.model.edge_features(pixels)
    split = lossless_ln1_split(pixels, 0)
    indices = split.encode_edge(pixels)
    with diag.mean_scale_restored(), pytest.raises(RuntimeError, match="same batch"):
        split(input_ids=prompt_ids(), image_indices=indices)


def test_the_report_names_no_share_where_indices_alone_already_match_the_base():
    """(a) level with LLaVA leaves no gap for (b) and (c) to close: the report says so instead of dividing by 0."""
    runs = {"fig7_L1_alignedvq_s0": 0.9, "diag_L1_residual_kept_s0": 0.92, "diag_L1_mean_scale_s0": 0.91}
    results = paper_report.Results({name: {"accuracy": value, "eval_split": "validation", "bytes_per_image": 121}
                                    for name, value in runs.items()})
    table = "\n".join(paper_report._diagnostic(results, base=90.0))
    assert "| 1 | — | unpaired | inconclusive | — | unpaired | inconclusive |" in table
    assert "Block 1:" not in table  # no reading of shares that do not exist
