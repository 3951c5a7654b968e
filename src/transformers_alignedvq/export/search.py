"""Codeword search for the edge: exact, or a low-dimensional shortlist re-ranked exactly.

The input DLP (and a down-projection, if any) is affine, ``z -> M z + c``, so the nearest codeword of the
projected feature is ``argmin_k ||e_k||^2 - 2 e_k.c - 2 (e_k M).z``: a search of the raw site feature against the
folded codebook ``E M`` with per-codeword offsets (``fold_codebook``). Both searches below run on those tables,
which are plain buffers computed once from the weights: no Python-side cache, so the module exports to ONNX and
with `torch.export` as it is.

* ``exact``: one ``(tokens x dim) @ (dim x K)`` product and an argmin (the dense limit).
* ``shortlist``: project the feature onto the top ``rank`` right singular vectors of the folded codebook, score
  every codeword there (``(tokens x rank) @ (rank x K)``), keep the ``candidates`` best, and re-rank those with
  exact distances. The result is the exact nearest codeword whenever it is among the candidates; the
  benchmark (`benchmarks/edge_encode.py`) reports how often that holds on real features. Ties between
  candidates resolve to the lowest score, as in ``exact``; a different winner only when the exact one missed
  the shortlist.

Residual VQ (`ResidualCodewordSearch`) folds the same way. Stage ``s`` searches ``r = y - prev`` (``y = M z + c``
the projected feature, ``prev`` the sum of the codewords the stages before it chose) against its codebook
``E``: ``argmin_k ||e_k||^2 - 2 e_k.c - 2 (e_k M).z + 2 e_k.prev``. The first three terms are stage 1's folded
tables; the last needs only ``prev``, a sum of gathered codewords. Its shortlist projects ``r`` onto the top right
singular vectors ``B`` of ``E``: ``B r = (B M) z + B c - B prev``. So no stage ever forms ``y`` (a ``dim x dim``
product per token): each costs what stage 1 costs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..models.llava_alignedvq.alignedvq_layer import fold_codebook

SEARCH_METHODS = ("exact", "shortlist")


@dataclass(frozen=True)
class SearchConfig:
    """How the edge finds codewords. ``rank`` and ``candidates`` apply to ``shortlist`` only."""

    method: str = "exact"
    rank: int = 64
    candidates: int = 8

    def __post_init__(self):
        if self.method not in SEARCH_METHODS:
            raise ValueError(f"search method {self.method!r} must be one of {SEARCH_METHODS}")
        if self.rank < 1 or self.candidates < 1:
            raise ValueError(f"search rank and candidates must be >= 1, got {self.rank}, {self.candidates}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict | None) -> "SearchConfig":
        try:
            return cls(**(values or {}))
        except TypeError as exc:
            raise ValueError(f"invalid search settings {values!r}: {exc}") from None


class CodewordSearch(nn.Module):
    """Nearest-codeword search on folded tables (see the module docstring). ``forward`` maps features
    ``(..., dim)`` to int64 indices ``(...)``."""

    def __init__(self, folded: torch.Tensor, offsets: torch.Tensor, config: SearchConfig = SearchConfig()):
        super().__init__()
        self.config = config
        self.register_buffer("folded", folded.float().contiguous(), persistent=False)
        self.register_buffer("offsets", offsets.float().contiguous(), persistent=False)
        if config.method == "shortlist":
            rank = min(config.rank, folded.shape[1], folded.shape[0])
            _, _, vh = torch.linalg.svd(folded.double(), full_matrices=False)
            basis = vh[:rank]  # (rank, dim), orthonormal rows
            self.register_buffer("basis", basis.float().contiguous(), persistent=False)
            self.register_buffer("folded_low", (folded.double() @ basis.T).float().contiguous(), persistent=False)

    def extra_repr(self) -> str:
        return f"codebook_size={self.folded.shape[0]}, dim={self.folded.shape[1]}, {self.config}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z.float()
        if self.config.method == "exact":
            return torch.addmm(self.offsets, z.reshape(-1, z.shape[-1]), self.folded.T, alpha=-2.0).argmin(-1).reshape(z.shape[:-1])
        return self._shortlist(z)

    def _shortlist(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.reshape(-1, z.shape[-1])  # (N, dim)
        approx = torch.addmm(self.offsets, flat @ self.basis.T, self.folded_low.T, alpha=-2.0)  # (N, K)
        count = min(self.config.candidates, self.folded.shape[0])
        candidates = approx.topk(count, dim=-1, largest=False, sorted=False).indices  # (N, c)
        # index_select (ONNX Gather) rather than advanced indexing (GatherND): several times faster in ORT
        picked = candidates.reshape(-1)
        rows = self.folded.index_select(0, picked).reshape(*candidates.shape, -1)  # (N, c, dim)
        exact = self.offsets.index_select(0, picked).reshape(candidates.shape)
        exact = exact - 2.0 * (rows @ flat.unsqueeze(-1)).squeeze(-1)  # (N, c)
        best = exact.argmin(-1, keepdim=True)
        return candidates.gather(-1, best).reshape(z.shape[:-1])


class ResidualStage(nn.Module):
    """One later stage of a residual search: ``(z, prev) -> indices`` (module docstring). Tables in fp32 buffers,
    built from the stage's codebook ``(K, d)`` and the pre-quantization affine ``y = z @ weight.T + bias``.

    The codebook is kept centred (``codebook = E - center``; ranking by ``||r - e_k||`` does not change when the
    codewords and the feature move together, and centred tables keep fp32's digits for the differences), so
    ``fold_codebook``'s tables apply as they are; a chosen codeword is ``codebook[k] + center``.
    """

    def __init__(self, codebook: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, config: SearchConfig):
        super().__init__()
        self.config = config
        folded, offsets = fold_codebook(codebook, weight, bias)
        center = codebook.double().mean(0)
        book, shift = codebook.double() - center, bias.double() - center
        buffers = {"codebook": book, "center": center, "folded": folded, "offsets": offsets,
                   "norms": book.pow(2).sum(-1)}
        if config.method == "shortlist":
            rank = min(config.rank, *book.shape)
            basis = torch.linalg.svd(book, full_matrices=False)[2][:rank]  # (rank, d)
            buffers.update(basis=basis, projection=basis @ weight.double(), projection_bias=basis @ shift,
                           low=book @ basis.T)
        for name, value in buffers.items():
            self.register_buffer(name, value.float().contiguous(), persistent=False)

    def forward(self, flat: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        """``flat`` ``(N, dim)`` raw features, ``prev`` ``(N, d)`` the codewords chosen so far -> ``(N,)``."""
        if self.config.method == "exact":
            scores = torch.addmm(self.offsets, flat, self.folded.T, alpha=-2.0) + 2.0 * prev @ self.codebook.T
            return scores.argmin(-1)
        low = torch.addmm(self.projection_bias, flat, self.projection.T) - prev @ self.basis.T  # (N, rank)
        approx = torch.addmm(self.norms, low, self.low.T, alpha=-2.0)  # ||B r - B e_k||^2 + ||e_k off B||^2 + const
        count = min(self.config.candidates, self.folded.shape[0])
        candidates = approx.topk(count, dim=-1, largest=False, sorted=False).indices  # (N, c)
        picked = candidates.reshape(-1)
        rows = self.folded.index_select(0, picked).reshape(*candidates.shape, -1)  # (N, c, dim)
        words = self.codebook.index_select(0, picked).reshape(*candidates.shape, -1)  # (N, c, d)
        exact = self.offsets.index_select(0, picked).reshape(candidates.shape)
        exact = exact - 2.0 * (rows @ flat.unsqueeze(-1)).squeeze(-1) + 2.0 * (words @ prev.unsqueeze(-1)).squeeze(-1)
        return candidates.gather(-1, exact.argmin(-1, keepdim=True)).squeeze(-1)


class ResidualCodewordSearch(nn.Module):
    """Residual VQ on folded tables: stage 1 a `CodewordSearch`, each later stage a `ResidualStage`.
    ``forward`` maps features ``(..., dim)`` to int64 indices ``(..., stages)``.

    Args:
        codebooks: ``(stages, K, d)``, one codebook per stage (one group).
        weight, bias: the pre-quantization affine, ``y = z @ weight.T + bias``.
    """

    def __init__(self, codebooks: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 config: SearchConfig = SearchConfig()):
        super().__init__()
        self.config = config
        self.first = CodewordSearch(*fold_codebook(codebooks[0], weight, bias), config)
        self.register_buffer("first_codebook", codebooks[0].float().contiguous(), persistent=False)
        self.stages = nn.ModuleList(ResidualStage(book, weight, bias, config) for book in codebooks[1:])

    @property
    def folded(self) -> torch.Tensor:  # the first stage's table: its codebook size and input dimension
        return self.first.folded

    def extra_repr(self) -> str:
        return f"stages={1 + len(self.stages)}"

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat = z.float().reshape(-1, z.shape[-1])
        found = [self.first(flat)]
        prev = self.first_codebook.index_select(0, found[0])
        for stage in self.stages:
            found.append(stage(flat, prev))
            prev = prev + stage.codebook.index_select(0, found[-1]) + stage.center
        return torch.stack(found, -1).reshape(*z.shape[:-1], len(found))


__all__ = ["SEARCH_METHODS", "CodewordSearch", "ResidualCodewordSearch", "ResidualStage", "SearchConfig",
           "fold_codebook"]
