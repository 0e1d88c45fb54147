"""Exports: lowbit checkpoints in the formats other engines serve (`lowbit export --to NAME`).

Each export is registered here by name with what it writes; its module (imported when it
runs) gives ``export(loaded, out, requantize) -> (path, plan)``, which checks everything
before it writes and writes under a temporary name.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Export:
    name: str
    module: str
    writes: str  # what --out names
    engines: str  # who reads it


EXPORTS = {e.name: e for e in (
    Export("gguf", "lowbit.export.gguf", "a .gguf file", "llama.cpp (llama-cli, llama-server, llama-cpp-python), ollama, LM Studio"),
)}
