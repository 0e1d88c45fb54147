"""Random models written to disk block by block, for measuring models larger than memory.

`write_random_model` writes a model of any size the config describes as Hugging Face
safetensors shards (one per decoder block, one per other tensor) with their index, never
holding more than one block in memory: a 7B-parameter model is written on a machine that
could not hold it in float32. The weights are N(0, 0.02²) (norm weights 1, biases 0), so
the model is a stand-in for memory and time, not for quality.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from lowbit.models.streamed import HF_INDEX


def write_random_model(directory: Path, config, tokenizer, dtype: torch.dtype = torch.float32, seed: int = 0) -> int:
    """Write a random ``config`` (a transformers config) with ``tokenizer`` into the new
    directory ``directory``, its tensors in ``dtype``; returns the bytes of its tensors."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()
    shapes = {n: t.shape for n, t in model.state_dict().items()}  # tied tensors appear under their first name only
    generator = torch.Generator().manual_seed(seed)
    groups: dict[str, list[str]] = {}
    for name in shapes:
        parts = name.split(".")
        key = ".".join(parts[:3]) if name.startswith("model.layers.") else name
        groups.setdefault(key, []).append(name)
    directory.mkdir(parents=True)
    weight_map, total = {}, 0
    for i, names in enumerate(groups.values()):
        tensors = {}
        for name in names:
            if name.endswith("norm.weight"):
                value = torch.ones(shapes[name])
            elif name.endswith(".bias"):
                value = torch.zeros(shapes[name])
            else:
                value = torch.randn(shapes[name], generator=generator).mul_(0.02)
            tensors[name] = value.to(dtype)
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    (directory / HF_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return total


__all__ = ["write_random_model"]
