"""Integer-arithmetic linears: W8A8 (report §3.4) and LLM.int8() (report §7.1).

Both hold the weight as int8, symmetric, one scale per output channel; activations are
quantised to int8 in the forward pass, symmetric, per token (dynamic) or per tensor
(static, from calibration); the product is the exact integer product with int32 results
(``int8_matmul``) and the scales are applied once per output element afterwards:

    Y = S_x S_w (X_q W_qᵀ) + b                                                    (§3.4)

Stored tensors (both modules):
    weight_int8:  int8 (out_features, in_features), W_q = Round(W / S_w), |W_q| <= 127
    weight_scale: float32 (out_features,), S_w = max_j |W_ij| / 127
    input_scale:  float32 (), S_x for static per-tensor activations (W8A8 only)
    bias:         the layer's float bias, if any
LLM.int8() also stores, for the input channels that calibration found to be outliers,
their float weight columns (`outlier_weight`, (out_features, n_outlier) in the model's
float dtype) and their indices (`outlier_channels`, int64).
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import LowbitError
from lowbit.numerics.spec import ACT_GRANULARITIES

INT8_MAX = 127


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8 (Eq. 3.1/3.3 with Z = 0): (int8 (out, in), float32 (out,))."""
    w = weight.detach().to(torch.float32)
    scale = (w.abs().amax(1) / INT8_MAX).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def quantize_rows_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (per-row) symmetric int8 of x (tokens, k): (int8 (tokens, k), float32 (tokens, 1))."""
    scale = (x.abs().amax(1, keepdim=True) / INT8_MAX).clamp(min=1e-12)
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8), scale


def quantize_tensor_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-tensor symmetric int8 with a fixed (calibrated) scale; values beyond it clip."""
    return torch.clamp(torch.round(x / scale), -INT8_MAX, INT8_MAX).to(torch.int8)


# Products of two codes in [-127, 127] are at most 127² = 16129 in magnitude; 1024 of them sum
# to at most 16,516,096 < 2²⁴, so a float32 dot product over a 1024-column slice of integer
# codes is exact whatever order BLAS adds in (every partial sum is an integer below 2²⁴).
EXACT_FLOAT_SLICE = 1024


def int8_matmul(x_q: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """X_q W_qᵀ exactly, as int32: int8 (m, k) x int8 (n, k) -> int32 (m, n), codes in [-127, 127].

    On CUDA this is ``torch._int_mm`` (int8 tensor cores; it needs more than 16 rows, so
    decode-sized inputs are padded, and k, n multiples of 8, else the exact float path runs).
    On the CPU, torch's ``_int_mm``
    was measured 94x slower than a float32 matmul of the same shape on this project's
    AVX2 machines (512 x 2048 x 5632: 20.8 s vs 0.22 s), so the product runs in float32
    BLAS over slices of EXACT_FLOAT_SLICE columns, each exact (see above), summed in int32:
    the same integers as ``_int_mm`` (tested), at BLAS speed.
    """
    if x_q.is_cuda and x_q.shape[1] % 8 == 0 and w_q.shape[0] % 8 == 0:
        rows = x_q.shape[0]
        if rows <= 16:  # cuBLAS's int8 path takes more than 16 rows: pad with zero rows
            x_q = torch.cat([x_q, x_q.new_zeros(17 - rows, x_q.shape[1])])
        return torch._int_mm(x_q, w_q.t())[:rows]
    out = None
    for lo in range(0, x_q.shape[1], EXACT_FLOAT_SLICE):
        part = (x_q[:, lo : lo + EXACT_FLOAT_SLICE].float() @ w_q[:, lo : lo + EXACT_FLOAT_SLICE].float().t()).to(torch.int32)
        out = part if out is None else out.add_(part)
    return out


class W8A8Linear(nn.Module):
    """A linear whose matmul runs in int8 with int32 accumulation (see module docstring).

    act_granularity: "token" (dynamic, a scale per row of X computed in the forward pass) or
    "tensor" (static: one calibrated ``input_scale``; clips what exceeds it).
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 act_granularity: str = "token", input_scale: torch.Tensor | None = None):
        super().__init__()
        if act_granularity not in ACT_GRANULARITIES:
            raise LowbitError(f"act_granularity {act_granularity!r} is unknown; use one of {', '.join(ACT_GRANULARITIES)}")
        if act_granularity == "tensor" and input_scale is None:
            raise LowbitError("static per-tensor activations need a calibrated input_scale")
        self.out_features, self.in_features = weight_int8.shape
        self.act_granularity = act_granularity
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("input_scale", None if input_scale is None else input_scale.reshape(()).to(torch.float32).clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, act_granularity: str = "token", input_scale: torch.Tensor | None = None) -> "W8A8Linear":
        q, scale = quantize_weight_int8(linear.weight)
        return cls(q, scale, linear.bias, act_granularity, input_scale)

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_int8.to(torch.float32) * self.weight_scale[:, None]

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 X_q (tokens, k) and its scale, (tokens, 1) or ()."""
        if self.act_granularity == "token":
            return quantize_rows_int8(x2d)
        return quantize_tensor_int8(x2d, self.input_scale), self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).to(torch.float32)
        x_q, x_scale = self.quantize_input(x2d)
        y = int8_matmul(x_q, self.weight_int8).to(torch.float32) * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def config(self) -> dict:
        return {"shape": [self.out_features, self.in_features], "bias": self.bias is not None, "act_granularity": self.act_granularity}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], name: str) -> "W8A8Linear":
        out_features, in_features = config["shape"]
        _check(name, tensors, {"weight_int8": (out_features, in_features), "weight_scale": (out_features,)})
        return cls(tensors["weight_int8"], tensors["weight_scale"], tensors.get("bias"), config["act_granularity"], tensors.get("input_scale"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, W8A8 act={self.act_granularity}"


class LLMInt8Linear(nn.Module):
    """LLM.int8() mixed-precision decomposition (report §7.1).

    Per forward: the input columns whose magnitude reaches ``threshold`` on any token
    (O = {j : max_t |X_tj| >= threshold}) are multiplied in floating point with float
    weight columns; the rest run vector-wise in int8 (X per row, W per output channel) with
    int32 accumulation; the two results are summed:

        Y = X_O W_Oᵀ + S_x S_w (Q(X_¬O) Q(W_¬O)ᵀ)

    Float columns come from ``outlier_weight`` for the channels calibration flagged (kept
    in the model's float dtype, a handful per layer at threshold 6); a column that turns
    into an outlier only at run time uses its dequantised int8 weight. With threshold = inf
    this is W8A8 with per-token activations; with threshold = 0 and every channel flagged
    it is the float layer.
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None,
                 threshold: float, outlier_channels: torch.Tensor, outlier_weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.threshold = float(threshold)
        self.register_buffer("weight_int8", weight_int8.contiguous())
        self.register_buffer("weight_scale", weight_scale.to(torch.float32))
        self.register_buffer("outlier_channels", outlier_channels.to(torch.long))
        self.register_buffer("outlier_weight", outlier_weight.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.calls = 0
        self.outlier_columns = 0  # summed over calls, for the report

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float, outlier_channels: torch.Tensor) -> "LLMInt8Linear":
        q, scale = quantize_weight_int8(linear.weight)
        channels = outlier_channels.to(torch.long).sort().values
        return cls(q, scale, linear.bias, threshold, channels, linear.weight.detach()[:, channels].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2d = x.reshape(-1, shape[-1])
        outliers = x2d.abs().amax(0) >= self.threshold  # (in,)
        self.calls += 1
        self.outlier_columns += int(outliers.sum())
        regular = x2d.to(torch.float32).masked_fill(outliers, 0.0)
        x_q, x_scale = quantize_rows_int8(regular)
        y = int8_matmul(x_q, self.weight_int8).to(torch.float32) * x_scale * self.weight_scale
        if outliers.any():
            columns = torch.nonzero(outliers).flatten()
            weight = self.weight_int8[:, columns].to(torch.float32) * self.weight_scale[:, None]
            # flagged channels use their stored float weights
            stored = torch.isin(columns, self.outlier_channels)
            if stored.any():
                position = torch.searchsorted(self.outlier_channels, columns[stored])
                weight[:, stored] = self.outlier_weight[:, position].to(torch.float32)
            y = y + x2d[:, columns].to(torch.float32) @ weight.T
        if self.bias is not None:
            y = y + self.bias.to(torch.float32)
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    @property
    def outlier_share(self) -> float:
        """Mean share of input columns taken out as outliers per call so far."""
        return self.outlier_columns / max(self.calls, 1) / self.in_features

    def config(self) -> dict:
        return {"shape": [self.out_features, self.in_features], "bias": self.bias is not None, "threshold": self.threshold,
                "n_outlier_channels": int(self.outlier_channels.numel())}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], name: str) -> "LLMInt8Linear":
        out_features, in_features = config["shape"]
        n = config["n_outlier_channels"]
        _check(name, tensors, {"weight_int8": (out_features, in_features), "weight_scale": (out_features,),
                               "outlier_channels": (n,), "outlier_weight": (out_features, n)})
        return cls(tensors["weight_int8"], tensors["weight_scale"], tensors.get("bias"), config["threshold"],
                   tensors["outlier_channels"], tensors["outlier_weight"])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, LLM.int8() threshold={self.threshold:g}, float channels={self.outlier_channels.numel()}"


def _check(name: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple]) -> None:
    for key, shape in expected.items():
        if key not in tensors:
            raise LowbitError(f"{name}: the checkpoint lacks tensor {key!r}; it is incomplete, re-quantise it")
        if tuple(tensors[key].shape) != shape:
            raise LowbitError(f"{name}.{key} has shape {tuple(tensors[key].shape)}, expected {shape}; the checkpoint is corrupted")
