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
        """x: (..., in_features) inputs of the layer.

        XᵀX is symmetric: for wide inputs only the blocks on and above the diagonal are
        multiplied (3 of 4 for two column blocks, 6 of 9 for three) and the rest mirrored.
        """
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        total = self.tokens + rows.shape[0]
        n = rows.shape[1]
        parts = 3 if n >= 1024 else 2 if n >= 512 else 1
        bounds = [n * i // parts for i in range(parts + 1)]
        blocks = [slice(bounds[i], bounds[i + 1]) for i in range(parts)]
        for i, bi in enumerate(blocks):
            for bj in blocks[i:]:
                self.hessian[bi, bj].mul_(self.tokens / total).addmm_(rows[:, bi].T, rows[:, bj], alpha=2.0 / total)
        for i, bi in enumerate(blocks):
            for bj in blocks[i + 1 :]:
                self.hessian[bj, bi] = self.hessian[bi, bj].T
        self.tokens = total


class InputStatistics:
    """Per-channel |x| maximum and mean over every input row seen, plus the first
    ``keep_rows`` rows themselves (whole calibration samples, so every position is
    represented) for searches that need real inputs (SmoothQuant's α, AWQ's scales and
    clipping).

    absmax, absmean: float32 (in_features,); rows(): float32 (kept, in_features).
    """

    def __init__(self, in_features: int, keep_rows: int = 4096):
        self.absmax = torch.zeros(in_features)
        self.abssum = torch.zeros(in_features, dtype=torch.float64)
        self.tokens = 0
        self.keep_rows = keep_rows
        self._kept: list[torch.Tensor] = []
        self._n_kept = 0

    def add(self, x: torch.Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
        mags = rows.abs()
        self.absmax = torch.maximum(self.absmax, mags.amax(0))
        self.abssum += mags.sum(0, dtype=torch.float64)
        self.tokens += rows.shape[0]
        if self._n_kept < self.keep_rows:
            self._kept.append(rows[: self.keep_rows - self._n_kept].clone())
            self._n_kept += len(self._kept[-1])

    @property
    def absmean(self) -> torch.Tensor:
        return (self.abssum / max(self.tokens, 1)).to(torch.float32)

    def rows(self) -> torch.Tensor:
        return torch.cat(self._kept)
