"""Evaluate models larger than memory: every window through one decoder block at a time.

`evaluate_streamed` scores models opened with `lowbit.models.streamed.open_streamed` (a
float source or a lowbit checkpoint, its quantised linears kept packed) with the numbers
`lowbit.evaluation.evaluate` gives for the same models in memory. It turns the order of
work around: instead of each window through the whole model, all windows go through one
block, which is then released:

1. the embeddings are read and every window's block-0 inputs captured
   (`capture_block_inputs`, as calibration does);
2. each decoder block in turn is read, runs every window (its quantised linears
   dequantised once for the block, as `evaluate` does for the model), and goes back to
   the meta device;
3. the blocks are replaced by stand-ins that hand the model the stored output of the last
   block for the window it is given (and the input embeddings by one that reads nothing),
   the final norm and the output head are read, and
   `evaluate`'s own loop runs: final norm, output head, log-softmax, KLD and top-1,
   exactly as for a model in memory. (A quantised output head computes from its float
   copy in memory at this step; the decoder blocks' linears stayed packed.)

Peak memory is the largest block (in float, twice for a quantised block: codes and their
dequantised copy), plus every model's hidden states for all windows (n × ctx × hidden
float32 each), or in step 3 the final norms and heads of all models at once.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import ExitStack

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.engine import _Recorder, _block_output, capture_block_inputs
from lowbit.errors import LowbitError
from lowbit.evaluation.metrics import CHUNK_ELEMENTS, EvalResult, _evaluate, last_hidden_state, linear_storage, model_bytes
from lowbit.models.architectures import decoder_blocks
from lowbit.models.loading import LoadedModel
from lowbit.models.streamed import embeddings_loaded, load_part, release_part, stored_names
from lowbit.modules.quant_linear import dequantized_once
from lowbit.modules.swap import set_module
from lowbit.packed.qweight import bits_per_weight


class _NoEmbedding(nn.Module):
    """Stands in for the input embeddings in step 3: the stand-in blocks ignore what enters
    the first of them, so the embedding table (as large as the head) is not read again."""

    def __init__(self, hidden_size: int, dtype: torch.dtype):
        super().__init__()
        self.hidden_size, self.dtype = hidden_size, dtype

    def forward(self, input_ids):
        return torch.zeros(*input_ids.shape, self.hidden_size, dtype=self.dtype)


class _Replay(nn.Module):
    """Stands in for a decoder block in step 3: the last block returns the stored output of
    the window whose tokens the model was called with, the others pass their input on."""

    def __init__(self, original: nn.Module, outputs: torch.Tensor | None, current: dict):
        super().__init__()
        for attr in _Recorder.COPIED:
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))
        self.outputs, self.current = outputs, current

    def forward(self, hidden_states, *args, **kwargs):
        if self.outputs is None:
            return hidden_states
        return self.outputs[self.current["window"]][None]


def _input_embeddings(model: nn.Module) -> tuple[str, nn.Module]:
    embedding = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is embedding), embedding


@dataclasses.dataclass
class _BlockPass:
    """One model's pass through its blocks: the last block's outputs (n, ctx - 1, hidden)
    float32, the blocks' linear storage and tensor bytes, the input embeddings' bytes, and
    the seconds spent."""

    outputs: torch.Tensor
    linear_bytes: int
    linear_weights: int
    tensor_bytes: int
    embedding_bytes: int
    seconds: float


def _through_blocks(loaded: LoadedModel, inputs: torch.Tensor, batch_size: int, progress: bool, label: str) -> _BlockPass:
    model, arch = loaded.model, loaded.arch
    start = time.perf_counter()
    with embeddings_loaded(loaded):
        embedding_bytes = model_bytes(model.get_input_embeddings())
        batches = capture_block_inputs(model, arch, inputs, batch_size)
    linear_bytes = linear_weights = tensor_bytes = 0
    blocks = decoder_blocks(model, arch)
    for index in tqdm(range(len(blocks)), desc=f"{label} (streamed)", unit="block", disable=not progress):
        prefix = f"{arch.blocks}.{index}"
        load_part(loaded, prefix)
        block = blocks[index]
        with dequantized_once(block):
            for batch in batches:
                batch.hidden = _block_output(block(batch.hidden, **batch.block_kwargs[index]))
        nbytes, count = linear_storage(block)
        linear_bytes, linear_weights = linear_bytes + nbytes, linear_weights + count
        tensor_bytes += model_bytes(block)
        release_part(model, prefix)
    outputs = torch.cat([b.hidden for b in batches])
    return _BlockPass(outputs, linear_bytes, linear_weights, tensor_bytes, embedding_bytes, time.perf_counter() - start)


def streamed_eval_estimate(models: list[LoadedModel], windows: int, ctx: int) -> dict:
    """Peak memory (MB) of `evaluate_streamed` on ``models`` (opened streamed) over
    ``windows`` windows of ``ctx`` tokens, by phase (module docstring), before any weight is
    read: the largest input embeddings in float (the capture); the largest block in float
    twice over (read, and the float copy it computes with); every model's hidden states twice (inputs and outputs of a block); and, for the
    head phase, every model's final norm and head, the evaluation's three chunk buffers and
    one window's full logits three times over (its head check)."""
    from lowbit.system import resident_bytes

    hidden = sum(windows * (ctx - 1) * m.model.config.get_text_config(decoder=True).hidden_size * 4 for m in models)
    block = outside = capture = 0
    for loaded in models:
        model, arch = loaded.model, loaded.arch
        params = model.state_dict(keep_vars=True)
        float_bytes = {n: t.numel() * 4 for n, t in params.items()}
        block = max(block, sum(float_bytes[n] for n in stored_names(model, f"{arch.blocks}.0")))
        embedding = _input_embeddings(model)[0]
        outside += sum(float_bytes[n] for n in params if not n.startswith((arch.blocks + ".", embedding + ".")))  # norm, head (tied or not)
        capture = max(capture, sum(float_bytes[n] for n in params if n.startswith(embedding + ".")))
    vocab = models[0].model.get_output_embeddings().out_features
    base = resident_bytes() + 2 * hidden
    blocks = 2 * block
    head = outside + 3 * CHUNK_ELEMENTS * 4 + 3 * ctx * vocab * 4
    return {"peak_mb": (base + max(capture, blocks, head)) / 1e6, "hidden_mb": 2 * hidden / 1e6, "capture_mb": capture / 1e6,
            "block_mb": blocks / 1e6, "head_mb": head / 1e6}


@torch.no_grad()
def evaluate_streamed(models: dict[str, LoadedModel], windows: torch.Tensor, reference: LoadedModel | None = None,
                      batch_size: int = 4, progress: bool = True) -> list[EvalResult]:
    """`lowbit.evaluation.evaluate`'s scores for models opened streamed (module docstring).

    models: label -> a `LoadedModel` from `open_streamed`; reference: one of them or
    another, scored against as in `evaluate`. windows: int64 (n, ctx). batch_size: windows
    run through a block at once. Every model is left on the meta device.
    Returns one `EvalResult` per model, in the order given; bits per weight and bytes are
    those of the stored model, seconds its blocks' and head's compute.
    """
    everyone = {id(m): m for m in [*models.values(), *([reference] if reference is not None else [])]}
    for loaded in everyone.values():
        if not isinstance(loaded, LoadedModel) or not loaded.is_streamed:
            raise LowbitError("evaluate_streamed takes models opened with lowbit.loader.open_streamed; use evaluate for models in memory")
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2 or windows.dtype != torch.long or windows.shape[1] < 2:
        raise LowbitError("evaluate_streamed takes windows as an int64 (n, ctx >= 2) tensor; build them with lowbit.data.eval_windows")
    from lowbit.system import return_freed_memory

    return_freed_memory()  # as quantize_streamed: freed blocks go back to the system, not to the heap
    inputs = windows[:, :-1]
    lookup = {row.numpy().tobytes(): i for i, row in enumerate(inputs)}
    labels = {id(m): label for label, m in models.items()}
    passes = {key: _through_blocks(m, inputs, batch_size, progress, labels.get(key, "reference")) for key, m in everyone.items()}
    current = {"window": None}

    def select_window(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        current["window"] = lookup[ids[0].numpy().tobytes()]

    originals, embeddings, hooks = {}, {}, []
    try:
        for key, loaded in everyone.items():
            blocks = decoder_blocks(loaded.model, loaded.arch)
            originals[key] = list(blocks)
            last = len(blocks) - 1
            for i, block in enumerate(originals[key]):
                blocks[i] = _Replay(block, passes[key].outputs if i == last else None, current)
            embeddings[key] = _input_embeddings(loaded.model)
            set_module(loaded.model, embeddings[key][0], _NoEmbedding(loaded.model.config.get_text_config(decoder=True).hidden_size, loaded.dtype))
            load_part(loaded, "")  # with the blocks and the embeddings out of the tree: the final norm and the head
            hooks.append(loaded.model.base_model.register_forward_pre_hook(select_window, with_kwargs=True))
        with ExitStack() as stack:
            for loaded in everyone.values():
                stack.enter_context(dequantized_once(loaded.model))
            scored = _evaluate({label: m.model for label, m in models.items()}, windows, None if reference is None else reference.model,
                               progress, last_hidden_state)
        results = []
        for (label, loaded), result in zip(models.items(), scored, strict=True):
            done = passes[id(loaded)]
            nbytes, count = linear_storage(loaded.model)
            nbytes, count = nbytes + done.linear_bytes, count + done.linear_weights
            embedding = embeddings[id(loaded)][0]
            tied = any(target.startswith(embedding + ".") for target in loaded.weights.ties.values())  # then counted with the head
            total = model_bytes(loaded.model) + done.tensor_bytes + (0 if tied else done.embedding_bytes)
            results.append(dataclasses.replace(result, bits_per_weight=bits_per_weight(nbytes, count) if count else float("nan"),
                                               model_bytes=total,
                                               seconds=result.seconds + done.seconds))
        return results
    finally:
        for hook in hooks:
            hook.remove()
        for key, loaded in everyone.items():
            if key in originals:
                blocks = decoder_blocks(loaded.model, loaded.arch)
                for i, block in enumerate(originals[key]):
                    blocks[i] = block
            if key in embeddings:
                set_module(loaded.model, *embeddings[key])
            release_part(loaded.model, "")


__all__ = ["evaluate_streamed", "streamed_eval_estimate"]
