"""Matrix multiplication in quantised arithmetic (report §3.4), reference implementation.

With X ~ S_x (X_q - Z_x) and W ~ S_w (W_q - Z_w), a product expands to

    Y ~ S_x S_w (X_q W_q - X_q Z_w - Z_x W_q + Z_x Z_w)                      (§3.4)

Every term in the bracket is an integer sum, accumulated here in int64 (exact for any
shape), then scaled once per output element. With Z_x = Z_w = 0 (symmetric) it collapses
to the single product S_x S_w (X_q W_q).

Layout follows ``nn.Linear``: X is (tokens, K), W is stored (N, K) = (out, in) and Y = X W^T
is (tokens, N). Group-wise weight scales (N, n_groups) are handled by summing each group's
integer partial product scaled by its own S_w, so accumulation stays integer inside a group.
"""

from __future__ import annotations

import torch

from lowbit.errors import SpecError
from lowbit.numerics.formats import IntFormat
from lowbit.numerics.quantization import Quantized


def integer_values(q: Quantized) -> torch.Tensor:
    """The integers X_q of Eq. 3.1 behind the codes of an `IntFormat` tensor, int64."""
    fmt = q.spec.number_format
    if not isinstance(fmt, IntFormat) or (not q.spec.symmetric and q.spec.zero_point != "int"):
        raise SpecError("integer matmul needs integer codes with an integer (or no) zero-point")
    return fmt.decode(q.codes).to(torch.int64)


def _per_row(t: torch.Tensor | None, rows: int) -> torch.Tensor:
    """(rows|1, 1) parameters -> float64 (rows, 1); None -> zeros."""
    if t is None:
        return torch.zeros(rows, 1, dtype=torch.float64)
    return t.to(torch.float64).expand(rows, 1)


def quantized_matmul(x: Quantized, w: Quantized) -> torch.Tensor:
    """Y = X W^T computed from integer codes by the expansion of §3.4; float64 (tokens, N).

    x: activations quantised per tensor or per token (one group per row).
    w: weights (N, K) quantised per tensor, per channel or group-wise.
    """
    xq, wq = integer_values(x), integer_values(w)
    tokens, k = xq.shape
    n = wq.shape[0]
    if x.spec.granularity not in ("tensor", "token", "channel"):
        raise SpecError("activations must be quantised per tensor or per token for an integer matmul")
    s_x, z_x = _per_row(x.scale, tokens), _per_row(x.zero, tokens)
    z_x_int = z_x.to(torch.int64)
    w_scale = w.scale.to(torch.float64).expand(n, -1)
    w_zero = torch.zeros_like(w_scale) if w.zero is None else w.zero.to(torch.float64).expand(n, -1)
    group = k if w.scale.shape[-1] == 1 else w.group_size
    y = torch.zeros(tokens, n, dtype=torch.float64)
    for g, start in enumerate(range(0, k, group)):
        xs, ws = xq[:, start : start + group], wq[:, start : start + group]
        z_w = w_zero[:, g].to(torch.int64)  # (N,)
        length = xs.shape[1]
        acc = (
            xs @ ws.T  # X_q W_q
            - xs.sum(1, keepdim=True) * z_w  # X_q Z_w
            - z_x_int * ws.sum(1)  # Z_x W_q
            + length * z_x_int * z_w  # Z_x Z_w, summed over the group's K
        )
        y += s_x * w_scale[:, g] * acc.to(torch.float64)
    return y


def symmetric_matmul(x: Quantized, w: Quantized) -> torch.Tensor:
    """The collapsed symmetric form Y = S_x S_w (X_q W_q) (§3.4), per-channel weights; float64."""
    if not (x.spec.symmetric and w.spec.symmetric) or w.scale.shape[-1] != 1:
        raise SpecError("the one-product form needs symmetric X and W and one weight scale per row")
    acc = integer_values(x) @ integer_values(w).T
    return x.scale.to(torch.float64) * w.scale.to(torch.float64).reshape(1, -1) * acc.to(torch.float64)
