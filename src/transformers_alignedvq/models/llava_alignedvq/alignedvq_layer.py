"""The AlignedVQ layer: input DLP -> (optional down-projection) -> vector quantizer -> (up-projection) ->
output DLP. Pure tensor math, importable on the edge without Transformers.

The edge half is :meth:`AlignedVQLayer.encode` (features -> indices); the cloud half is
:meth:`AlignedVQLayer.decode` (indices -> features). :meth:`AlignedVQLayer.forward` is both halves with
straight-through gradients and EMA codebook updates, for training.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .dlp import DualLinearProjection
from .quantizer import VectorQuantizer, nearest_codeword


def fold_codebook(codebook: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables for searching raw features ``z`` against ``codebook`` ``(K, d)`` after ``z -> z @ weight.T + bias``.

    Returns ``folded`` ``(K, dim)`` and ``offsets`` ``(K,)`` in fp32 such that the nearest codeword of the
    projected feature is ``argmin_k offsets_k - 2 folded_k . z``. The codebook is centred on its mean first
    (distances do not change under translation) to keep fp32 precision for features far from the origin.
    """
    codebook, weight, bias = codebook.double(), weight.double(), bias.double()
    center = codebook.mean(0)
    codebook, bias = codebook - center, bias - center
    return (codebook @ weight).float(), (codebook.pow(2).sum(-1) - 2.0 * codebook @ bias).float()


@dataclass
class AlignedVQLayerOutput:
    """Attributes:
    features: ``(*batch, dim)`` recovered features (output DLP applied), in the input dtype.
    indices: ``(*batch, codes_per_token)`` int64 codeword indices, exactly what the edge sends.
    commitment_loss: scalar, unweighted ``||Z - sg(Q(Z))||^2`` on the quantizer input (training only).
    perplexity: scalar codebook perplexity of this batch (``None`` outside training).
    usage: scalar fraction of codewords used in this batch (``None`` outside training).
    """

    features: torch.Tensor
    indices: torch.Tensor
    commitment_loss: torch.Tensor | None = None
    perplexity: torch.Tensor | None = None
    usage: torch.Tensor | None = None


class AlignedVQLayer(nn.Module):
    """Vector quantization with Dual Linear Projection, placed inside a vision transformer block.

    Args:
        dim: feature dimension at the split site (the vision hidden size).
        codebook_size: codewords per codebook ``K``.
        codebook_dim: dimension the quantizer works in; when it differs from ``dim`` a linear map projects
            down before and up after the quantizer (factorised codes).
        num_codebooks: residual VQ stages.
        num_groups: grouped VQ slices.
        use_dlp: include the two Dual Linear Projections (Eq. 2); without them the layer is plain VQ.
        ema_decay, dead_code_threshold: see :class:`VectorQuantizer`.
        dlp_init_std: initial standard deviation of the DLP projection weights.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        num_codebooks: int = 1,
        num_groups: int = 1,
        use_dlp: bool = True,
        ema_decay: float = 0.99,
        dead_code_threshold: float = 0.01,
        dlp_init_std: float = 0.02,
    ):
        super().__init__()
        codebook_dim = codebook_dim or dim
        self.dim = dim
        self.dlp_in = DualLinearProjection(dim, init_std=dlp_init_std) if use_dlp else None
        self.project_in = nn.Linear(dim, codebook_dim) if codebook_dim != dim else None
        self.quantizer = VectorQuantizer(
            codebook_dim,
            codebook_size,
            num_codebooks=num_codebooks,
            num_groups=num_groups,
            ema_decay=ema_decay,
            dead_code_threshold=dead_code_threshold,
        )
        self.project_out = nn.Linear(codebook_dim, dim) if codebook_dim != dim else None
        self.dlp_out = DualLinearProjection(dim, init_std=dlp_init_std) if use_dlp else None
        self._folded_cache: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    @property
    def codebook_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def codes_per_token(self) -> int:
        return self.quantizer.codes_per_token

    # ----------------------------------------------------------------------------------------------------
    def pre_quantization(self, z: torch.Tensor) -> torch.Tensor:
        """Input DLP and down-projection: site features -> what the codebook sees."""
        if self.dlp_in is not None:
            z = self.dlp_in(z)
        if self.project_in is not None:
            z = self.project_in(z)
        return z

    def post_quantization(self, zq: torch.Tensor) -> torch.Tensor:
        """Up-projection and output DLP: codewords -> features handed to the rest of the block."""
        if self.project_out is not None:
            zq = self.project_out(zq)
        if self.dlp_out is not None:
            zq = self.dlp_out(zq)
        return zq

    def _pre_quantization_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``pre_quantization`` as ``z -> z @ M.T + c`` (it is affine), in fp32."""
        device = self.quantizer.codebook.device
        weight, bias = torch.eye(self.dim, device=device), torch.zeros(self.dim, device=device)
        if self.dlp_in is not None:
            weight, bias = self.dlp_in.affine()
        if self.project_in is not None:
            p_w, p_b = self.project_in.weight.float(), self.project_in.bias.float()
            weight, bias = p_w @ weight, p_w @ bias + p_b
        return weight, bias

    def _folded_tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`fold_codebook` tables for the current weights: searching raw site features against them
        picks the same codeword as projecting first, and saves the ``dim x dim`` input-DLP matmul. Cached
        until a parameter or the codebook changes (training moves both); the edge module keeps them as
        buffers instead."""
        tensors = [self.quantizer.codebook, *self.parameters()]
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        if self._folded_cache is None or self._folded_cache[0] != key:
            with torch.no_grad():
                folded, offsets = fold_codebook(self.quantizer.codebook[0, 0], *self._pre_quantization_affine())
            self._folded_cache = (key, folded, offsets)
        return self._folded_cache[1], self._folded_cache[2]

    @property
    def can_fold(self) -> bool:
        """Folding applies to a single codebook and group (residual stages need the projected feature)."""
        return self.quantizer.num_codebooks == 1 and self.quantizer.num_groups == 1

    @torch.no_grad()
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Edge half: site features ``(*batch, dim)`` -> indices ``(*batch, codes_per_token)``."""
        if self.can_fold:
            folded, offsets = self._folded_tables()
            flat = z.reshape(-1, self.dim)
            idx = nearest_codeword(flat, folded, bias=offsets)
            return idx.reshape(*z.shape[:-1], 1)
        return self.quantizer.encode(self.pre_quantization(z))

    def decode(self, indices: torch.Tensor, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Cloud half: indices ``(*batch, codes_per_token)`` -> features ``(*batch, dim)``."""
        zq = self.quantizer.decode(indices)
        param = next(self.parameters(), None)
        zq = zq.to(dtype or (param.dtype if param is not None else zq.dtype))
        return self.post_quantization(zq)

    def forward(self, z: torch.Tensor) -> AlignedVQLayerOutput:
        """Both halves. Training: straight-through gradients, EMA codebook update, commitment loss and
        codebook statistics. Evaluation: exactly ``decode(encode(z))`` and nothing else, so a model evaluated
        on pixels computes what the edge and the cloud compute together (loss included)."""
        if not self.training:
            indices = self.encode(z)
            return AlignedVQLayerOutput(features=self.decode(indices, dtype=z.dtype), indices=indices)
        out = self.quantizer(self.pre_quantization(z))
        return AlignedVQLayerOutput(
            features=self.post_quantization(out.quantized),
            indices=out.indices,
            commitment_loss=out.commitment_loss,
            perplexity=out.perplexity,
            usage=out.usage,
        )

    @torch.no_grad()
    def init_codebook(self, z: torch.Tensor, *, iters: int = 20, seed: int = 0) -> None:
        """K-means initialisation from site features ``z`` ``(N, dim)`` of any dtype, passed through the input
        DLP in fp32 (the codebook is fp32 whatever the model's dtype)."""
        weight, bias = self._pre_quantization_affine()
        pre = torch.addmm(bias, z.to(device=weight.device, dtype=torch.float32), weight.T)
        self.quantizer.init_from_features(pre, iters=iters, seed=seed)

    @torch.no_grad()
    def fit_codebook(self, features: list[torch.Tensor], *, iters: int = 20, max_features: int = 200_000,
                     seed: int = 0) -> int:
        """`init_codebook` on site features gathered in pieces ``[(n_i, dim), ...]``, at most ``max_features``
        of them (a random subset drawn with ``seed``). Returns the number of features clustered."""
        if not features:
            raise ValueError("init_codebook got no calibration batches.")
        z = torch.cat([f.reshape(-1, f.shape[-1]) for f in features]).float()
        if z.shape[0] > max_features:
            z = z[torch.randperm(z.shape[0], generator=torch.Generator().manual_seed(seed))[:max_features]]
        self.init_codebook(z.to(self.quantizer.codebook.device), iters=iters, seed=seed)
        return z.shape[0]


__all__ = [
    "AlignedVQLayer",
    "AlignedVQLayerOutput",
    "fold_codebook",
]
