"""llama.cpp, through llama-cpp-python and its own tools: what the export checks and the
benchmarks ask of it. Optional: `scripts/install-llama-cpp.sh` builds it (a one-time compile
of a few minutes); nothing else in lowbit imports this module.

Numbers from llama.cpp differ slightly from lowbit's on the same weights: its CPU dot
products for block-quantised weights round the activations to 8 bits (q8_0/q8_K blocks)
before multiplying. On the packaged SmolLM2 file that puts its perplexity about +0.2-0.5%
above transformers' float copy of the same weights; the checks compare against that margin.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lowbit.errors import LowbitError

TOOLS_ENV = "LOWBIT_LLAMA_CPP_BIN"  # a directory holding llama-perplexity, llama-quantize, ...
DEFAULT_TOOLS = Path(__file__).resolve().parents[2] / ".engines" / "llama.cpp" / "build" / "bin"


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def open_model(path: str | Path, ctx: int = 512, threads: int | None = None, logits_all: bool = True):
    """A llama_cpp.Llama over the GGUF file ``path`` (CPU, ``threads`` default: all cores)."""
    try:
        import llama_cpp
    except ImportError as err:
        raise LowbitError("llama-cpp-python is not installed; run scripts/install-llama-cpp.sh") from err
    return llama_cpp.Llama(str(path), n_ctx=ctx, logits_all=logits_all, verbose=False, n_threads=threads or os.cpu_count(),
                           n_batch=ctx)


def logits(model, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one window), float32 (len, vocab)."""
    model.reset()
    model.eval(ids)
    return np.array(model.scores[: len(ids)], dtype=np.float32)


def greedy(model, ids: list[int], n: int) -> list[int]:
    """``n`` greedy tokens after ``ids`` (no sampling, no repetition penalty)."""
    model.reset()
    out = []
    for token in model.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        out.append(int(token))
        if len(out) == n:
            break
    return out


def tool(name: str) -> Path:
    """The path of one of llama.cpp's tools (llama-perplexity, llama-quantize, ...)."""
    for folder in (os.environ.get(TOOLS_ENV), DEFAULT_TOOLS):
        if folder and (Path(folder) / name).is_file():
            return Path(folder) / name
    found = shutil.which(name)
    if found:
        return Path(found)
    raise LowbitError(f"llama.cpp's {name} is not built; run scripts/install-llama-cpp.sh (or set {TOOLS_ENV})")
