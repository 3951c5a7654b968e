"""Vector quantization for AlignedVQ: nearest-codeword search, EMA codebooks, residual and grouped VQ.

Pure tensor math (PyTorch only, no Transformers import) so the edge device can run it without the rest of
the stack. Notation follows the paper (arXiv 2411.05961, Section 2.1):

* a codebook ``e`` of ``K`` codewords of dimension ``d``; ``Q_e(z) = e_i`` with ``i = argmin_k ||z - e_k||``
  (Eq. 1);
* residual VQ: ``num_codebooks`` stages, stage ``q`` quantizes what the stages before it left over;
* grouped VQ: the feature is cut into ``num_groups`` equal slices, each with its own codebooks;
* codebooks follow an exponential moving average of the features assigned to them (Van den Oord et al.,
  2017) instead of receiving gradients; the encoder gets straight-through gradients and the commitment loss
  ``||Z - sg(Q_e(Z))||^2`` (Eq. 3).

Index layout: one token yields ``num_codebooks * num_groups`` indices, ordered stage-major:
position ``q * num_groups + g`` holds the index of stage ``q`` in group ``g``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# One definition of the index width, shared with the wire format (numpy only, so still edge-safe).

# Distance rows per chunk are sized so one chunk of the (tokens x K) distance matrix stays near 64 MiB in fp32.
_DISTANCE_BUDGET_ELEMENTS = 1 << 24


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` in place over all processes; a no-op outside ``torch.distributed``."""
    if _is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` everywhere with rank ``src``'s copy; a no-op outside ``torch.distributed``."""
    if _is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def squared_norms(codebook: torch.Tensor) -> torch.Tensor:
    """``||e_k||^2`` for each codeword, in fp32: ``(..., K, d) -> (..., K)``."""
    return codebook.float().pow(2).sum(-1)


def nearest_codeword(
    x: torch.Tensor,
    codebook: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Index of the nearest codeword for every row (Eq. 1), batched over leading group dimensions.

    ``argmin_k ||x - e_k||^2 = argmin_k (||e_k||^2 - 2 x . e_k)``: one matrix product per chunk, with the
    distance matrix never larger than ``chunk_size x K``. The search always runs in fp32 so fp16/bf16 models
    pick the same codeword as fp32 ones (in half precision ``||e||^2 - 2 x.e`` loses the digits that separate
    close codewords).

    Args:
        x: ``(G, N, d)`` or ``(N, d)`` features.
        codebook: ``(G, K, d)`` or ``(K, d)`` codewords.
        bias: per-codeword offset replacing ``||e_k||^2`` (``(G, K)`` or ``(K,)``); used by folded searches,
            which centre the codebook themselves. Without it the search centres on the codebook mean.
        chunk_size: rows per chunk; default keeps each chunk near 64 MiB.

    Returns:
        ``(G, N)`` or ``(N,)`` int64 indices.
    """
    squeeze = x.dim() == 2
    if squeeze:
        x, codebook = x.unsqueeze(0), codebook.unsqueeze(0)
        bias = None if bias is None else bias.unsqueeze(0)
    groups, n, _ = x.shape
    k = codebook.shape[1]
    codebook = codebook.float()
    center = None
    if bias is None:
        # Distances do not change under translation; centring on the codebook mean keeps ||e||^2 and x.e
        # small, so their difference keeps its precision even for features far from the origin.
        center = codebook.mean(dim=1, keepdim=True)
        codebook = codebook - center
        bias = squared_norms(codebook)
    bias = bias.float()
    bias = bias.unsqueeze(1)  # (G, 1, K)
    codebook_t = codebook.transpose(1, 2)  # (G, d, K)
    if chunk_size is None:
        chunk_size = max(1, _DISTANCE_BUDGET_ELEMENTS // (k * groups))
    out = torch.empty(groups, n, dtype=torch.long, device=x.device)
    for start in range(0, n, chunk_size):
        stop = min(n, start + chunk_size)
        rows = x[:, start:stop].float()
        if center is not None:
            rows = rows - center
        distances = torch.baddbmm(bias, rows, codebook_t, beta=1.0, alpha=-2.0)
        out[:, start:stop] = distances.argmin(-1)
    return out.squeeze(0) if squeeze else out


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on ``x`` ``(N, d)``; returns centroids ``(K, d)`` and cluster sizes ``(K,)``.

    Initialised from distinct random samples; a cluster that loses all its points is re-seeded with a random
    point so every codeword ends up in use. With fewer points than clusters the remaining centroids are
    copies of random points plus small noise, which EMA training then separates.
    """
    x = x.float()
    n, d = x.shape
    if n == 0:
        raise ValueError("k-means needs at least one calibration feature, got none.")
    if n >= num_clusters:
        centroids = _kmeans_plus_plus(x, num_clusters, generator)
    else:
        picks = torch.randint(n, (num_clusters,), generator=generator, device="cpu").to(x.device)
        noise = torch.randn(num_clusters, d, generator=generator, device="cpu").to(x.device)
        centroids = x[picks] + 1e-3 * x.std() * noise
    counts = torch.zeros(num_clusters, device=x.device)
    for _ in range(iters):
        assign = nearest_codeword(x, centroids)
        counts = torch.bincount(assign, minlength=num_clusters).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        empty = counts == 0
        centroids = torch.where(empty[:, None], centroids, sums / counts.clamp(min=1)[:, None])
        if empty.any() and n >= num_clusters:
            reseed = torch.randint(n, (int(empty.sum()),), generator=generator, device="cpu").to(x.device)
            centroids[empty] = x[reseed]
    return centroids, counts


def _kmeans_plus_plus(x: torch.Tensor, num_clusters: int, generator: torch.Generator | None) -> torch.Tensor:
    """k-means++ seeding on a random subset of at most ``4 K`` points.

    Seeding costs ``K x subset x d``; on the full calibration set (hundreds of thousands of LLaVA tokens)
    that would dwarf the Lloyd iterations, and a subset a few times larger than K already spreads the seeds
    across the clusters, which is what plain random seeding gets wrong.
    """
    n = x.shape[0]
    subset = x[torch.randperm(n, generator=generator, device="cpu")[: min(n, 4 * num_clusters)].to(x.device)]
    first = int(torch.randint(subset.shape[0], (1,), generator=generator, device="cpu"))
    chosen = [first]
    closest = (subset - subset[first]).pow(2).sum(-1)
    for _ in range(1, num_clusters):
        weights = closest.cpu().double()
        if weights.sum() <= 0:
            weights = torch.ones_like(weights)
        pick = int(torch.multinomial(weights, 1, generator=generator))
        chosen.append(pick)
        closest = torch.minimum(closest, (subset - subset[pick]).pow(2).sum(-1))
    return subset[chosen].clone()


def codebook_perplexity(counts: torch.Tensor) -> torch.Tensor:
    """``exp(entropy)`` of code usage per codebook, ``(..., K) -> (...)``: K when all codes are used equally."""
    probs = counts.float() / counts.float().sum(-1, keepdim=True).clamp(min=1)
    entropy = -(probs * torch.log(probs.clamp(min=1e-12))).sum(-1)
    return entropy.exp()


@dataclass
class QuantizerOutput:
    """What :class:`VectorQuantizer` returns.

    Attributes:
        quantized: ``(*batch, dim)`` quantized features; straight-through gradients flow to the input in training.
        indices: ``(*batch, num_codebooks * num_groups)`` int64 codeword indices.
        commitment_loss: scalar ``||z - sg(quantized)||^2`` (mean over elements), unweighted.
        perplexity: scalar mean codebook perplexity over this batch's assignments.
        usage: scalar fraction of codewords used in this batch.
    """

    quantized: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VectorQuantizer(nn.Module):
    """Residual + grouped vector quantizer with EMA codebook updates.

    Buffers (all fp32, saved with the model): ``codebook`` ``(num_codebooks, num_groups, K, dim/num_groups)``,
    and the EMA state ``cluster_size`` ``(num_codebooks, num_groups, K)`` and ``embed_sum`` (same shape as the
    codebook). Under ``torch.distributed`` the per-step statistics are summed over all processes before the
    update and re-seeded codewords are broadcast from rank 0, so every rank keeps an identical codebook
    without relying on the wrapper (DDP or not) to synchronise buffers.

    Args:
        dim: feature dimension ``d`` quantized per token.
        codebook_size: ``K`` codewords per codebook.
        num_codebooks: residual stages.
        num_groups: groups the feature is split into (must divide ``dim``).
        ema_decay: EMA decay of the codebook statistics, in ``(0, 1)``.
        dead_code_threshold: a codeword whose EMA cluster size falls below this fraction of the mean cluster
            size is re-seeded with a feature from the current batch (as an average-sized cluster); 0 disables
            re-seeding. Relative, so the same value works for any batch size and codebook size.
        eps: Laplace smoothing of cluster sizes.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        num_codebooks: int = 1,
        num_groups: int = 1,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.01,
        eps: float = 1e-5,
    ):
        super().__init__()
        if dim % num_groups:
            raise ValueError(f"dim={dim} is not divisible by num_groups={num_groups}.")
        self.dim = dim
        self.codebook_size = codebook_size
        self.num_codebooks = num_codebooks
        self.num_groups = num_groups
        self.group_dim = dim // num_groups
        self.ema_decay = ema_decay
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        shape = (num_codebooks, num_groups, codebook_size, self.group_dim)
        self.register_buffer("codebook", torch.randn(shape, dtype=torch.float32))
        self.register_buffer("cluster_size", torch.ones(shape[:-1], dtype=torch.float32))
        self.register_buffer("embed_sum", self.codebook.clone())

    @property
    def codes_per_token(self) -> int:
        return self.num_codebooks * self.num_groups

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, codebook_size={self.codebook_size}, num_codebooks={self.num_codebooks}, "
            f"num_groups={self.num_groups}, ema_decay={self.ema_decay}"
        )

    def _apply(self, fn, recurse=True):
        # `model.half()` / `.to(torch.bfloat16)` must move the codebook state but not round it: EMA updates
        # and the wire-format fingerprint need the fp32 values.
        # Only when a dtype changed do we go back to the unrounded original (moved to the new device).
        before = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != torch.float32:
                source = new if old.is_meta or new.is_meta else old
                self._buffers[name] = source.to(device=new.device, dtype=torch.float32)
        return self

    # ----------------------------------------------------------------------------------------------------
    # search / lookup
    # ----------------------------------------------------------------------------------------------------
    def _split_groups(self, z: torch.Tensor) -> torch.Tensor:
        """``(N, dim) -> (G, N, d)``."""
        return z.reshape(z.shape[0], self.num_groups, self.group_dim).transpose(0, 1)

    def _merge_groups(self, z: torch.Tensor) -> torch.Tensor:
        """``(G, N, d) -> (N, dim)``."""
        return z.transpose(0, 1).reshape(z.shape[1], self.dim)

    def _lookup_stage(self, stage: int, idx: torch.Tensor) -> torch.Tensor:
        """``idx`` ``(G, N)`` -> codewords ``(G, N, d)`` of residual stage ``stage``."""
        book = self.codebook[stage]  # (G, K, d)
        return torch.gather(book, 1, idx.unsqueeze(-1).expand(-1, -1, self.group_dim))

    def _quantize(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Residual/grouped search. Returns quantized ``(N, dim)`` fp32, indices ``(N, Q, G)`` and the stage
        inputs ``(Q, G, N, d)`` (what each codebook saw, for EMA)."""
        residual = self._split_groups(flat.float())
        quantized = torch.zeros_like(residual)
        indices, stage_inputs = [], []
        for stage in range(self.num_codebooks):
            idx = nearest_codeword(residual, self.codebook[stage])
            codes = self._lookup_stage(stage, idx)
            stage_inputs.append(residual)
            indices.append(idx)
            quantized = quantized + codes
            residual = residual - codes
        indices = torch.stack(indices).permute(2, 0, 1)  # (N, Q, G)
        return self._merge_groups(quantized), indices, torch.stack(stage_inputs)

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Indices ``(*batch, codes_per_token)`` of features ``z`` ``(*batch, dim)``."""
        flat = z.reshape(-1, self.dim)
        _, indices, _ = self._quantize(flat)
        return indices.reshape(*z.shape[:-1], self.codes_per_token)

    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Codebook lookup: indices ``(*batch, codes_per_token)`` -> fp32 features ``(*batch, dim)``.

        Indices are trusted here; :func:`validate_indices` is the boundary check.
        """
        batch_shape = indices.shape[:-1]
        idx = indices.reshape(-1, self.num_codebooks, self.num_groups).permute(1, 2, 0)  # (Q, G, N)
        out = sum(self._lookup_stage(stage, idx[stage]) for stage in range(self.num_codebooks))
        return self._merge_groups(out).reshape(*batch_shape, self.dim)

    def validate_indices(self, indices: torch.Tensor) -> None:
        """Raise ``ValueError`` unless ``indices`` are integers in ``[0, codebook_size)``."""
        if not isinstance(indices, torch.Tensor):
            raise ValueError(f"indices must be a torch.Tensor of integers, got {type(indices).__name__}.")
        if indices.dtype == torch.bool or indices.is_floating_point() or indices.is_complex():
            raise ValueError(f"indices must have an integer dtype, got {indices.dtype}.")
        if indices.numel():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.codebook_size:
                bad = low if low < 0 else high
                raise ValueError(
                    f"index {bad} is out of range for a codebook of size {self.codebook_size}: "
                    f"indices must lie in [0, {self.codebook_size})."
                )

    # ----------------------------------------------------------------------------------------------------
    # training
    # ----------------------------------------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """Quantize ``z`` ``(*batch, dim)``; in training mode also update the codebooks by EMA."""
        flat = z.reshape(-1, self.dim)
        quantized, indices, stage_inputs = self._quantize(flat.detach())
        counts = self._counts(indices)
        if self.training and self.ema_decay < 1.0:
            self._ema_update(indices, stage_inputs, counts)
        quantized = quantized.to(z.dtype)
        commitment = F.mse_loss(flat, quantized.detach())
        # Straight-through estimator: forward value is the codeword, gradient goes to the encoder unchanged.
        quantized = flat + (quantized - flat).detach()
        return QuantizerOutput(
            quantized=quantized.reshape(z.shape),
            indices=indices.reshape(*z.shape[:-1], self.codes_per_token),
            commitment_loss=commitment,
            perplexity=codebook_perplexity(counts).mean(),
            usage=(counts > 0).float().mean(),
        )

    def _counts(self, indices: torch.Tensor) -> torch.Tensor:
        """Assignments per codeword ``(Q, G, K)`` from indices ``(N, Q, G)``."""
        q, g, k = self.num_codebooks, self.num_groups, self.codebook_size
        offsets = torch.arange(q * g, device=indices.device).reshape(q, g) * k
        flat = (indices + offsets).reshape(-1)
        return torch.bincount(flat, minlength=q * g * k).float().reshape(q, g, k)

    @torch.no_grad()
    def _ema_update(self, indices: torch.Tensor, stage_inputs: torch.Tensor, counts: torch.Tensor) -> None:
        q, g, k, d = self.num_codebooks, self.num_groups, self.codebook_size, self.group_dim
        offsets = torch.arange(q * g, device=indices.device).reshape(q, g) * k
        flat_idx = (indices + offsets).permute(1, 2, 0).reshape(-1)  # (Q*G*N,) matching stage_inputs order
        sums = torch.zeros(q * g * k, d, device=stage_inputs.device)
        sums.index_add_(0, flat_idx, stage_inputs.reshape(-1, d))
        counts = all_reduce_sum_(counts.clone())
        sums = all_reduce_sum_(sums).reshape(q, g, k, d)

        decay = self.ema_decay
        self.cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.cluster_size.sum(-1, keepdim=True)
        smoothed = (self.cluster_size + self.eps) / (total + k * self.eps) * total
        self.codebook.copy_(self.embed_sum / smoothed.unsqueeze(-1))
        if self.dead_code_threshold > 0:
            self._reseed_dead_codes(stage_inputs)

    @torch.no_grad()
    def _reseed_dead_codes(self, stage_inputs: torch.Tensor) -> None:
        # cluster_size is identical on every rank, so every rank finds the same dead codes; the replacement
        # features come from rank 0's batch so the codebooks stay identical.
        # The threshold is relative to the mean cluster size (the EMA of features per step divided by K), so
        # what counts as dead does not depend on the batch size: with an absolute threshold, a batch of a few
        # images (a few hundred features for thousands of codes) would keep re-seeding most of the codebook.
        mean_size = self.cluster_size.mean(-1, keepdim=True)  # (Q, G, 1)
        dead = self.cluster_size < self.dead_code_threshold * mean_size  # (Q, G, K)
        num_dead = int(dead.sum())
        if num_dead == 0:
            return
        pos = dead.nonzero()  # (num_dead, 3): stage, group, code
        n = stage_inputs.shape[2]
        picks = torch.randint(n, (num_dead,), device=stage_inputs.device)
        samples = stage_inputs[pos[:, 0], pos[:, 1], picks].float().contiguous()
        broadcast_(samples)
        size = mean_size.expand_as(self.cluster_size)[dead]  # a re-seeded code starts as an average one
        self.codebook[dead] = samples
        self.embed_sum[dead] = samples * size.unsqueeze(-1)
        self.cluster_size[dead] = size

    @torch.no_grad()
    def init_from_features(self, z: torch.Tensor, *, iters: int = 20, seed: int = 0) -> None:
        """K-means initialisation of every codebook from calibration features ``z`` ``(N, dim)``.

        Stage ``q`` is fit on what stages ``< q`` leave over, group by group. Under ``torch.distributed``
        rank 0's result is broadcast so every process starts from the same codebook.
        """
        z = z.reshape(-1, self.dim).float().to(self.codebook.device)
        generator = torch.Generator().manual_seed(seed)
        residual = self._split_groups(z)  # (G, N, d)
        for stage in range(self.num_codebooks):
            for group in range(self.num_groups):
                centroids, _ = kmeans(residual[group], self.codebook_size, iters=iters, generator=generator)
                self.codebook[stage, group] = centroids
            residual = residual - self._lookup_stage(stage, nearest_codeword(residual, self.codebook[stage]))
        broadcast_(self.codebook)
        # Each codeword starts as if seen once: the EMA then moves it at the rate set by ema_decay, and a
        # codeword chosen far less often than the average one falls below the dead-code threshold.
        self.cluster_size.fill_(1.0)
        self.embed_sum.copy_(self.codebook)


__all__ = [
    "QuantizerOutput",
    "VectorQuantizer",
    "all_reduce_sum_",
    "broadcast_",
    "codebook_perplexity",
    "kmeans",
    "nearest_codeword",
    "squared_norms",
]
