"""Statistics a calibrated method accumulates from a linear layer's inputs, streamed batch
by batch so no layer's full activations are ever held."""

from __future__ import annotations

import torch


class HessianAccumulator:
    """H = 2/n Σ_t x_t x_tᵀ over every input row x_t seen (report §7.2), float32 (in, in).

    Kept as a running mean, H_n = n_old/n · H_old + 2/n · XᵀX, so its scale does not grow
    with the number of calibration tokens.
    """

    def __init__(self, in_features: int):
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float32)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """x: (..., in_features) inputs of the layer."""
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        total = self.tokens + rows.shape[0]
        self.hessian.mul_(self.tokens / total).addmm_(rows.T, rows, alpha=2.0 / total)
        self.tokens = total
