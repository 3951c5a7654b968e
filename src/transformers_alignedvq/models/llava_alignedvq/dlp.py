"""Dual Linear Projection (DLP), Eq. 2 of the paper: ``Z + tanh(gamma) * Linear(Z)``.

One instance sits before the quantizer (shaping features for the codebook) and one after it (restoring
what the next layer expects). ``gamma`` starts at 0, so a fresh DLP is the identity and a pretrained
model's behaviour is unchanged until finetuning moves it.
"""

from __future__ import annotations

import torch
from torch import nn


class DualLinearProjection(nn.Module):
    """Gated residual linear map ``z + tanh(gate) * proj(z)`` on the last dimension.

    Args:
        dim: feature dimension.
        init_std: standard deviation of the projection weights. They must not start at zero: with
            ``gate = 0`` the gradient of ``gate`` is ``proj(z)``, so a zero projection would never move.
    """

    def __init__(self, dim: int, *, init_std: float = 0.02):
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.gate = nn.Parameter(torch.zeros(()))
        self.init_std = init_std
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.proj.weight, std=self.init_std)
        nn.init.zeros_(self.proj.bias)
        nn.init.zeros_(self.gate)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + torch.tanh(self.gate) * self.proj(z)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The map as ``z -> z @ A.T + c``: returns ``(A, c)`` in fp32, ``A = I + tanh(gate) W``."""
        scale = torch.tanh(self.gate.float())
        weight = self.proj.weight.float()
        eye = torch.eye(weight.shape[0], dtype=weight.dtype, device=weight.device)
        return eye + scale * weight, scale * self.proj.bias.float()


__all__ = [
    "DualLinearProjection",
]
