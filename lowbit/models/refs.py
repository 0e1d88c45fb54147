"""What a model reference names, decided from the name and the file system alone (no torch):
a model shipped in a package, a GGUF file, a lowbit checkpoint directory or a Hugging Face
directory. `lowbit.loader.load_model`, `lowbit info` and the CLI's checks before any work
all ask `ref_kind`."""

from __future__ import annotations

from pathlib import Path

from lowbit.errors import LowbitError
from lowbit.models.registry import NAMED_MODELS

GGUF_MAGIC = b"GGUF"
CHECKPOINT_FILE = "lowbit.safetensors"
# A checkpoint written block by block (`lowbit quantize --low-memory`) holds shards
# lowbit-00001-of-000NN.safetensors and this index: the header and which shard holds each tensor.
SHARD_INDEX = "lowbit.safetensors.index.json"
PICKLED_WEIGHTS = ("pytorch_model.bin", "*.bin", "*.pt", "*.pth", "*.ckpt")
REF_KINDS = ("named", "gguf", "lowbit", "hf")


def describe_model_ref() -> str:
    return f"a named model ({', '.join(NAMED_MODELS)}), a .gguf file or a checkpoint directory"


def check_gguf_magic(path: Path) -> None:
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise LowbitError(f"could not read {path}: {err.strerror}") from None
    if magic != GGUF_MAGIC:
        raise LowbitError(f"{path} is not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r}); give a .gguf file or a checkpoint directory")


def ref_kind(ref: str) -> str:
    """One of `REF_KINDS` for ``ref``, or a one-line error saying what is wrong with it.

    A Hugging Face directory must hold safetensors weights: pickled PyTorch weights
    (pytorch_model.bin) can run code when loaded, so they are refused with what to do."""
    if ref in NAMED_MODELS:
        return "named"
    path = Path(ref)
    if not path.exists():
        raise LowbitError(f"model {ref!r} not found; give {describe_model_ref()}")
    if path.is_file():
        check_gguf_magic(path)
        return "gguf"
    if (path / CHECKPOINT_FILE).is_file() or (path / SHARD_INDEX).is_file():
        return "lowbit"
    if (path / "config.json").is_file():
        if any(path.glob("*.safetensors")):
            return "hf"
        pickled = sorted({p.name for pattern in PICKLED_WEIGHTS for p in path.glob(pattern)})
        if pickled:
            raise LowbitError(f"{path} holds PyTorch pickle weights ({', '.join(pickled[:3])}), which lowbit does not load (unpickling can run "
                              "code); convert them to safetensors (model.save_pretrained(DIR, safe_serialization=True)) and give that directory")
        raise LowbitError(f"{path} has a config.json but no *.safetensors weights; the checkpoint is incomplete")
    raise LowbitError(f"{path} holds neither {CHECKPOINT_FILE} ({SHARD_INDEX}) nor config.json; give {describe_model_ref()}")
