import pytest
import torch

from transformers_alignedvq.models.llava_alignedvq.alignedvq_layer import AlignedVQLayer
from transformers_alignedvq.models.llava_alignedvq.dlp import DualLinearProjection
from transformers_alignedvq.models.llava_alignedvq.quantizer import (
    VectorQuantizer,
    codebook_perplexity,
    kmeans,
    nearest_codeword,
)
from transformers_alignedvq.wire import bits_per_index


def brute_force(x, codebook):
    return torch.cdist(x.double(), codebook.double()).argmin(-1)


@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_nearest_codeword_matches_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    x, codebook = torch.randn(101, 24, generator=g), torch.randn(37, 24, generator=g)
    assert torch.equal(nearest_codeword(x, codebook, chunk_size=chunk_size), brute_force(x, codebook))
    xs, books = torch.randn(3, 50, 8, generator=g), torch.randn(3, 11, 8, generator=g)
    expected = torch.stack([brute_force(xs[i], books[i]) for i in range(3)])
    assert torch.equal(nearest_codeword(xs, books, chunk_size=chunk_size), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_search_stays_exact_in_half_precision(dtype):
    # Codewords far from the origin and close to each other: ||e||^2 - 2 x.e computed in half precision
    # cannot separate them (fp16 spacing near 6e4 is 32), fp32 can.
    g = torch.Generator().manual_seed(1)
    centre = torch.full((64,), 30.0)
    codebook = (centre + 0.25 * torch.randn(32, 64, generator=g)).to(dtype)
    x = (centre + 0.25 * torch.randn(200, 64, generator=g)).to(dtype)
    ours = nearest_codeword(x, codebook)
    assert torch.equal(ours, brute_force(x.float(), codebook.float()))
    naive = (codebook.float().pow(2).sum(-1) - 2 * x.float() @ codebook.float().T).to(dtype).argmin(-1)
    assert not torch.equal(naive, ours), "the test data must be hard enough to break a half-precision search"


def test_kmeans_recovers_separated_clusters():
    g = torch.Generator().manual_seed(2)
    centres = torch.randn(4, 6, generator=g) * 20
    points = torch.cat([c + torch.randn(100, 6, generator=g) for c in centres])
    found, counts = kmeans(points, 4, iters=20, generator=torch.Generator().manual_seed(0))
    assert counts.sum() == 400 and (counts == 100).all()
    match = torch.cdist(centres, found).min(-1).values
    assert (match < 0.5).all()


def test_ema_update_moves_codewords_by_the_exact_formula():
    q = VectorQuantizer(2, 2, ema_decay=0.9, dead_code_threshold=0.0, eps=0.0)
    q.codebook.copy_(torch.tensor([[[[0.0, 0.0], [10.0, 10.0]]]]))
    q.embed_sum.copy_(q.codebook)
    q.train()
    batch = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 9.0]])
    q(batch)
    # cluster sizes: 0.9*1 + 0.1*2 = 1.1 and 0.9*1 + 0.1*1 = 1.0; sums: 0.1*(1,1) and 0.9*(10,10)+0.1*(9,9)
    assert torch.allclose(q.cluster_size[0, 0], torch.tensor([1.1, 1.0]))
    assert torch.allclose(q.codebook[0, 0, 0], torch.tensor([0.1, 0.1]) / 1.1)
    assert torch.allclose(q.codebook[0, 0, 1], torch.tensor([9.9, 9.9]))
    q.eval()
    before = q.codebook.clone()
    q(batch)
    assert torch.equal(q.codebook, before), "evaluation must not update the codebook"


def test_dead_codes_are_reseeded_from_the_batch():
    q = VectorQuantizer(4, 8, ema_decay=0.5, dead_code_threshold=0.3)
    q.train()
    batch = torch.randn(64, 4) + 100.0  # far from every codeword: one code takes everything
    q(batch)
    # one step: the chosen code's EMA size is 0.5 + 32, the others 0.5, under 0.3 x the mean (4.5): re-seeded
    reseeded = (q.codebook[0, 0][:, None, :] == batch[None]).all(-1).any(-1)
    assert reseeded.sum() == 7
    mean = torch.tensor((32.5 + 7 * 0.5) / 8)
    assert torch.allclose(q.cluster_size[0, 0][reseeded], mean.expand(7))
    assert torch.allclose(q.embed_sum[0, 0][reseeded] / mean, q.codebook[0, 0][reseeded])


def test_dead_code_threshold_does_not_depend_on_the_batch_size():
    """Same usage pattern at two batch sizes 50x apart: the same codes are dead (EMA sizes scale with the batch)."""
    reseeded = []
    for scale in (0.05, 2.5):  # e.g. 200 vs 10,000 features per step over 4,096 codes
        q = VectorQuantizer(2, 8, ema_decay=0.9, dead_code_threshold=0.05)
        usage = torch.tensor([4.0, 2.0, 1.0, 1.0, 0.5, 0.04, 0.01, 0.0])  # relative to the others
        q.cluster_size[0, 0] = usage * scale
        before = q.codebook.clone()
        q._reseed_dead_codes(torch.randn(1, 1, 32, 2) + 50.0)
        reseeded.append((q.codebook != before).any(-1)[0, 0])
    # mean usage 1.06875: under 0.05 x that are the last three codes, at both scales
    assert reseeded[0].tolist() == reseeded[1].tolist() == [False] * 5 + [True] * 3


def test_straight_through_gradient_and_commitment_loss():
    q = VectorQuantizer(8, 16, ema_decay=1.0)
    z = torch.randn(5, 8, requires_grad=True)
    out = q(z)
    assert torch.allclose(out.commitment_loss, ((z - out.quantized) ** 2).mean())
    out.quantized.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    assert torch.allclose(out.quantized, q.decode(out.indices))


def test_residual_and_grouped_layout_and_error():
    g = torch.Generator().manual_seed(3)
    z = torch.randn(500, 16, generator=g)
    errors = {}
    for codebooks, groups in [(1, 1), (3, 1), (1, 4), (2, 4)]:
        q = VectorQuantizer(16, 32, num_codebooks=codebooks, num_groups=groups, ema_decay=1.0)
        q.init_from_features(z, iters=10)
        out = q(z)
        assert out.indices.shape == (500, codebooks * groups)
        assert torch.equal(q.encode(z), out.indices)
        assert torch.allclose(q.decode(out.indices), out.quantized, atol=1e-6)
        errors[(codebooks, groups)] = float(((out.quantized - z) ** 2).mean())
    assert errors[(3, 1)] < errors[(1, 1)] and errors[(1, 4)] < errors[(1, 1)]
    # layout: stage-major, so position q * groups + g decodes group g of stage q
    q = VectorQuantizer(4, 3, num_codebooks=2, num_groups=2, ema_decay=1.0)
    idx = torch.tensor([[0, 1, 2, 0]])
    expected = torch.cat([q.codebook[0, 0, 0] + q.codebook[1, 0, 2], q.codebook[0, 1, 1] + q.codebook[1, 1, 0]])
    assert torch.allclose(q.decode(idx)[0], expected)


def test_validate_indices():
    q = VectorQuantizer(4, 8)
    q.validate_indices(torch.tensor([0, 7]))
    for bad, words in [
        (torch.tensor([0, 8]), "out of range"),
        (torch.tensor([-1]), "out of range"),
        (torch.tensor([0.0]), "integer dtype"),
        (torch.tensor([True]), "integer dtype"),
        ([1, 2], "torch.Tensor"),
    ]:
        with pytest.raises(ValueError, match=words):
            q.validate_indices(bad)


def test_statistics_and_bits():
    assert torch.allclose(codebook_perplexity(torch.ones(16)), torch.tensor(16.0))
    assert torch.allclose(codebook_perplexity(torch.tensor([5.0, 0, 0, 0])), torch.tensor(1.0))
    assert [bits_per_index(k) for k in (2, 16, 17, 4096)] == [1, 4, 5, 12]


def test_codebook_state_stays_fp32_under_half():
    q = VectorQuantizer(4, 8)
    reference = q.codebook.clone()
    q.half()
    assert q.codebook.dtype == torch.float32 and torch.equal(q.codebook, reference)
    q.to(torch.bfloat16)
    assert q.embed_sum.dtype == q.cluster_size.dtype == torch.float32


def test_dlp_is_identity_at_init_and_learns():
    dlp = DualLinearProjection(8)
    z = torch.randn(3, 8)
    assert torch.equal(dlp(z), z)
    dlp(z).pow(2).sum().backward()
    assert dlp.gate.grad is not None and dlp.gate.grad.abs() > 0
    with torch.no_grad():
        dlp.gate.fill_(0.7)
    weight, bias = dlp.affine()
    assert torch.allclose(dlp(z), z @ weight.T + bias, atol=1e-6)


@pytest.mark.parametrize("codebook_dim", [None, 6])
def test_folded_edge_search_matches_project_then_search(codebook_dim):
    torch.manual_seed(4)
    layer = AlignedVQLayer(12, 64, codebook_dim=codebook_dim, ema_decay=1.0)
    with torch.no_grad():
        layer.dlp_in.gate.fill_(0.5)
        layer.dlp_in.proj.weight.normal_(std=0.3)
        layer.dlp_in.proj.bias.normal_()
    z = torch.randn(400, 12)
    assert layer.can_fold
    folded = layer.encode(z)
    unfolded = layer.quantizer.encode(layer.pre_quantization(z))
    assert torch.equal(folded, unfolded)
    # the cache follows parameter updates
    with torch.no_grad():
        layer.dlp_in.gate.fill_(-0.5)
    assert torch.equal(layer.encode(z), layer.quantizer.encode(layer.pre_quantization(z)))
