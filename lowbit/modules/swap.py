"""Find a model's linear layers and swap them for quantised ones."""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

def linear_layers(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every ``nn.Linear`` whose name no ``skip`` regex matches (re.search);
    methods skip `lowbit.methods.config.DEFAULT_SKIP` unless told otherwise. Embeddings are
    nn.Embedding, never nn.Linear, so they are never among them."""
    patterns = [re.compile(p) for p in skip]
    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and not any(p.search(name) for p in patterns)
    ]


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the dotted ``name`` points inside ``model``."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
