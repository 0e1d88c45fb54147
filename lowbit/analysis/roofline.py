"""The roofline view of decode and prefill (report §10).

A step's time is bounded below by the bytes it must move over memory bandwidth and by the
FLOPs it must do over peak compute: t = max(bytes / BW, FLOPs / peak). Decoding one token
reads every weight once (at its stored width: codes, scales and zero-points) and the KV
cache up to the current position, and does about 2 FLOPs per weight plus attention:
arithmetic intensity ~ 2 / (bytes per weight), far below any CPU's or GPU's ridge point,
so decode is bandwidth-bound and tokens/s scales with 1 / (bits per weight). Prefill of P
tokens reuses each weight P times and turns compute-bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from lowbit.methods.config import HEAD_SPECS
from lowbit.modules import QUANTIZED_MODULES, storage_bytes
from lowbit.numerics.spec import QuantSpec
from lowbit.packed.qweight import bits_per_weight, stored_bytes

# The weight formats of the decode-speed table (built by `lowbit.inference.speed`, priced by
# `lowbit.analysis.roofline_report`): block linears at these specs; an "h8" variant also
# rounds the output head to int8 per channel; the others keep a float32 head.
VARIANT_SPECS = {"W8": QuantSpec(bits=8, granularity="channel", group_size=None), "W4": QuantSpec(bits=4, group_size=128),
                 "W4A8": QuantSpec(bits=4, group_size=128)}
FLOAT_VARIANT_BITS = {"float32": 32.0, "bf16": 16.0}
HEAD_VARIANT_SPEC = HEAD_SPECS[8]


def variant_bits(variant: str, row: int = 2048) -> tuple[float, float]:
    """Storage bits per weight of a variant's block linears and of its output head, from
    their specs (scales priced on square ``row``-column layers: per-channel scales cost
    16 / row bits). bf16 halves the head too; other variants keep a float32 head."""
    if variant in FLOAT_VARIANT_BITS:
        bits = FLOAT_VARIANT_BITS[variant]
        return bits, bits
    def bits_of(spec: QuantSpec) -> float:
        return bits_per_weight(stored_bytes((row, row), spec), row * row)

    head = bits_of(HEAD_VARIANT_SPEC) if variant.endswith("h8") else 32.0
    return bits_of(VARIANT_SPECS[variant.split()[0]]), head


@dataclass
class SpeedRow:
    """One row of the roofline table: a weight format, its predicted decode tokens/s and
    prefill time, and (when the variant was built and run) the measured ones (NaN if not)."""

    variant: str
    bits_per_weight: float
    weight_bytes: int
    decode_tokens_per_second: float
    predicted_tokens_per_second: float
    prefill_seconds: float
    predicted_prefill_seconds: float
    intensity: float
    bound: str
    rounds: int = 0  # measured runs behind the medians (0: a prediction only)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Machine:
    """Memory bandwidth in GB/s and peak compute in GFLOP/s."""

    bandwidth_gbps: float
    peak_gflops: float

    @property
    def ridge(self) -> float:
        """FLOPs per byte above which a kernel is compute-bound."""
        return self.peak_gflops / self.bandwidth_gbps


def measure_machine(bytes_to_stream: int = 1 << 30, matmul: int = 2048) -> Machine:
    """This machine's streaming read bandwidth (sum over a 1 GiB float32 tensor) and float32
    matmul rate, each the best of three runs with all threads."""
    data = torch.ones(bytes_to_stream // 4)
    data.sum()
    best = min(_timed(lambda: data.sum()) for _ in range(3))
    a, b = torch.randn(matmul, matmul), torch.randn(matmul, matmul)
    a @ b
    mm = min(_timed(lambda: a @ b) for _ in range(3))
    return Machine(bandwidth_gbps=bytes_to_stream / best / 1e9, peak_gflops=2 * matmul**3 / mm / 1e9)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _linear_bytes(module: nn.Module) -> int:
    if isinstance(module, tuple(QUANTIZED_MODULES.values())):
        return storage_bytes(module)
    if hasattr(module, "read_bytes"):  # a KernelLinear: the codes, plus its float32 scales and zeros
        return module.read_bytes()
    return module.weight.numel() * module.weight.element_size()


@dataclass(frozen=True)
class StepCost:
    """bytes moved and FLOPs of one decode step (one token) or one prefill."""

    weight_bytes: int
    kv_bytes: int
    flops: float

    @property
    def bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes

    @property
    def intensity(self) -> float:
        return self.flops / self.bytes

    def seconds(self, machine: Machine) -> float:
        return max(self.bytes / (machine.bandwidth_gbps * 1e9), self.flops / (machine.peak_gflops * 1e9))

    def bound(self, machine: Machine) -> str:
        return "compute" if self.intensity > machine.ridge else "memory"

    def to_dict(self) -> dict:
        return {**asdict(self), "bytes": self.bytes, "intensity": self.intensity}


def _attention_shape(model: nn.Module) -> tuple[int, int, int, int, list[int | None]]:
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    windows = [config.sliding_window if t == "sliding_attention" else None for t in layer_types]
    return heads, kv_heads, head_dim, config.num_hidden_layers, windows


def decode_cost(model: nn.Module, context: int, kv_bits: float = 32.0) -> StepCost:
    """One decode step at position ``context``: every linear's stored bytes (lm_head
    included, read in full for every token), the KV cache read at ``kv_bits`` per element,
    2 FLOPs per weight plus 4 · heads · head_dim · attended tokens per layer."""
    weight_bytes, weights = 0, 0
    behind_kernels = {id(m.reference) for m in model.modules() if hasattr(m, "reference")}  # counted via their KernelLinear
    for module in model.modules():
        if id(module) in behind_kernels:
            continue
        if isinstance(module, (nn.Linear, *QUANTIZED_MODULES.values())) or hasattr(module, "reference"):
            weight_bytes += _linear_bytes(module)
            weights += module.in_features * module.out_features
    heads, kv_heads, head_dim, layers, windows = _attention_shape(model)
    attended = [context if w is None else min(context, w) for w in windows]
    kv_bytes = int(sum(2 * kv_heads * head_dim * n * kv_bits / 8 for n in attended))
    flops = 2.0 * weights + sum(4.0 * heads * head_dim * n for n in attended)
    return StepCost(weight_bytes, kv_bytes, flops)


def prefill_cost(model: nn.Module, prompt: int, kv_bits: float = 32.0) -> StepCost:
    """A prefill of ``prompt`` tokens: weights read once, the KV cache written once,
    2 FLOPs per weight per token plus causal attention."""
    step = decode_cost(model, 0, kv_bits)
    heads, kv_heads, head_dim, layers, windows = _attention_shape(model)
    attention = sum(2.0 * heads * head_dim * prompt * (prompt if w is None else min(prompt, w)) for w in windows)
    kv_bytes = int(layers * 2 * kv_heads * head_dim * prompt * kv_bits / 8)
    return StepCost(step.weight_bytes, kv_bytes, step.flops * prompt + attention)
