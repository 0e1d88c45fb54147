"""LoRA adapters on a frozen (quantised) base: QLoRA (report §7.5).

    y = base(x) + (α / r) · B A dropout(x),   A (r, in), B (out, r)

A starts Kaiming-uniform and B at zero, so a fresh adapter leaves the model unchanged. The
base is any linear, typically a `QuantLinear` holding NF4 weights, which computes with its
weight dequantised on the fly and keeps no float copy for backward.

Adapters save on their own (a safetensors file of the A and B matrices and a JSON config),
load onto a freshly quantised base, and merge into float weights: W' = Ŵ + (α / r) B A.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lowbit.errors import LowbitError
from lowbit.modules import QUANTIZED_MODULES
from lowbit.modules.swap import set_module
from lowbit.training.config import LoRAConfig

ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class LoRALinear(nn.Module):
    """A frozen base linear plus a trainable low-rank update (see module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.scaling = rank, alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return self.base(x) + update.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """Ŵ + (α / r) B A, float32 (out, in)."""
        if hasattr(self.base, "qweight"):  # QuantLinear
            base = self.base.qweight.dequantize(torch.float32)
        elif hasattr(self.base, "dequantized_weight"):  # W8A8Linear
            base = self.base.dequantized_weight()
        elif isinstance(self.base, nn.Linear):
            base = self.base.weight.float()
        else:
            raise LowbitError(f"cannot merge an adapter into a {type(self.base).__name__}")
        return base + self.scaling * (self.lora_B.float() @ self.lora_A.float())


def add_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every linear (float or quantised) whose name matches a target; freeze the rest.
    Returns the wrapped names."""
    patterns = [re.compile(t) for t in config.targets]
    kinds = (nn.Linear, *QUANTIZED_MODULES.values())
    names = [n for n, m in model.named_modules() if isinstance(m, kinds) and any(p.search(n) for p in patterns)]
    if not names:
        raise LowbitError(f"no linear matches the LoRA targets {list(config.targets)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        set_module(model, name, LoRALinear(model.get_submodule(name), config.rank, config.alpha, config.dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapters(model: nn.Module, out: str | Path, config: LoRAConfig, extra: dict | None = None) -> Path:
    """Write only the adapters: DIR/adapters.safetensors and DIR/adapter_config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, module in lora_modules(model).items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach().contiguous()
        tensors[f"{name}.lora_B"] = module.lora_B.detach().contiguous()
    save_file(tensors, out / ADAPTER_FILE)
    (out / ADAPTER_CONFIG).write_text(json.dumps({**asdict(config), **(extra or {})}, indent=2) + "\n")
    return out


def load_adapters(model: nn.Module, path: str | Path) -> LoRAConfig:
    """Wrap ``model``'s targets as the saved config says and load the saved A and B."""
    path = Path(path)
    if not (path / ADAPTER_FILE).is_file():
        raise LowbitError(f"{path} holds no {ADAPTER_FILE}; give a directory written by save_adapters / lowbit finetune")
    data = json.loads((path / ADAPTER_CONFIG).read_text())
    config = LoRAConfig(rank=data["rank"], alpha=data["alpha"], dropout=data["dropout"], targets=tuple(data["targets"]))
    add_lora(model, config)
    tensors = load_file(path / ADAPTER_FILE)
    modules = lora_modules(model)
    if set(tensors) != {f"{n}.{k}" for n in modules for k in ("lora_A", "lora_B")}:
        raise LowbitError(f"{path}: the adapters do not match this model's layers")
    with torch.no_grad():
        for name, module in modules.items():
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    return config


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Replace every LoRALinear by a float nn.Linear holding Ŵ + (α/r) B A; returns the count."""
    modules = lora_modules(model)
    for name, module in modules.items():
        bias = getattr(module.base, "bias", None)
        linear = nn.Linear(module.in_features, module.out_features, bias=bias is not None)
        linear.weight.copy_(module.merged_weight())
        if bias is not None:
            linear.bias.copy_(bias)
        set_module(model, name, linear)
    return len(modules)


def trainable_parameters(model: nn.Module) -> Sequence[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
