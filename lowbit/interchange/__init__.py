"""Interchange: lowbit checkpoints in the formats other engines serve (`lowbit export --to NAME`), and theirs opened as quantised models.

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
    Export("gguf", "lowbit.interchange.gguf", "a .gguf file", "llama.cpp (llama-cli, llama-server, llama-cpp-python), ollama, LM Studio"),
    Export("compressed-tensors", "lowbit.interchange.compressed_tensors", "a Hugging Face directory",
           "transformers (with the compressed-tensors package) and vLLM, as llm-compressor's output"),
)}


def recorded_source(header: dict) -> str | None:
    """The float model a checkpoint was quantised from, as its header names it, or None for
    a checkpoint opened from another tool's file (its header's source is that file itself)."""
    return header.get("recorded_source", header.get("source"))  # the importers always set recorded_source
