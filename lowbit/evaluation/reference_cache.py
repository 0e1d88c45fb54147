"""The reference model's final hidden states, kept on disk between evaluations.

Every checkpoint of one model is scored against the same float reference on the same
windows, and the reference's forward passes are half of each evaluation's work. Its final
hidden states (what the output projection reads; (windows, ctx - 1, hidden) float32, 47 MB
for SmolLM2's 40 x 512 tokens) are therefore stored once per reference and set of windows,
and an evaluation that finds them runs only the reference's output projection, so the
scores are the same numbers, bit for bit.

The key is a SHA-256 of everything the hidden states depend on: every tensor of the
reference (name, dtype, shape and bytes, so another model, another conversion of it or one
changed weight misses), the window tokens, and the torch, transformers and lowbit versions.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lowbit
from lowbit.outputs import new_file

TENSOR = "hidden"


def reference_key(reference: nn.Module, windows: torch.Tensor) -> str:
    """Hex SHA-256 naming ``reference``'s hidden states on ``windows`` (int64 (n, ctx))."""
    import transformers

    digest = hashlib.sha256()
    digest.update(f"torch {torch.__version__} transformers {transformers.__version__} lowbit {lowbit.__version__}".encode())
    for name, tensor in reference.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    digest.update(windows.contiguous().numpy().tobytes())
    return digest.hexdigest()


def cache_path(directory: Path, reference: nn.Module, windows: torch.Tensor) -> Path:
    return Path(directory) / f"{reference_key(reference, windows)}.safetensors"


def load_hidden(path: Path, windows: torch.Tensor) -> torch.Tensor | None:
    """The stored (n, ctx - 1, hidden) float32 hidden states, or None when there are none
    (or the file is not whole: it is then ignored and written again)."""
    if not path.is_file():
        return None
    try:
        hidden = load_file(str(path))[TENSOR]
    except (OSError, ValueError, KeyError):
        return None
    n, ctx = windows.shape
    return hidden if hidden.dim() == 3 and tuple(hidden.shape[:2]) == (n, ctx - 1) else None


def store_hidden(path: Path, hidden: torch.Tensor) -> None:
    """Write the hidden states (n, ctx - 1, hidden) under ``path``, whole or not at all."""
    with new_file(path, "reference cache file") as tmp:
        save_file({TENSOR: hidden.contiguous()}, str(tmp))
