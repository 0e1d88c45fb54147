"""Decode speed of float and quantised variants of one model, beside the roofline.

Variants (built from the same float32 model in one process, so ratios are side by side):
  float32   the model as loaded
  bf16      a bfloat16 copy
  W8        int8 per output channel, symmetric, CPU kernel
  W4        int4 groups of 128, symmetric, CPU kernel
  W4A8      the same int4 weights, activations int8 per token in blocks of 32 (the W4A8
            kernel: integer dot products; changes the numerics, see docs/results.md)
  W4 h8     W4 with the output head (lm_head) int8 per channel too (`lowbit quantize
            --head-bits 8`; llama.cpp's Q4 files keep the output tensor at 6 bits): beside
            4-bit blocks a float32 head is a third of a 1B Llama's bytes per token
  W4A8 h8   W4A8 with the int8 head
  W4 ref    the same int4 model on QuantLinear's reference path (dequantise + matmul)
Every variant decodes through the compiled step (`lowbit.inference.compiled_step`) where it
applies; "<variant> eager" is the same model decoded by transformers' forward per token (the
loop the step replaced), and the bf16 and reference rows are eager (the step computes
float32 and kernel layers only).

With a model that came from a GGUF file (the packaged ones) and llama-cpp-python installed,
the same weights also run in llama.cpp (`GGUF_VARIANTS`):
  Q4_0, Q8_0              the model quantised to that GGML type and exported (RTN; speed does
                          not depend on how the codes were chosen), then opened back from the
                          file (`open_quantized`: the file's codes) with the head on the file's
                          own codes of the output matrix (what llama.cpp reads) and int8
                          activations in every kernel layer (W4A8, W8A8: what llama.cpp's CPU
                          dot products do), through the compiled step
  Q4_0 llama.cpp, ...     llama.cpp (llama-cpp-python) decoding the same file greedily with
                          as many threads as torch, timed in the same rounds
"""

from __future__ import annotations

import copy
import gc
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from lowbit.analysis.roofline import HEAD_VARIANT_SPEC, VARIANT_SPECS, Machine, SpeedRow, decode_cost, prefill_cost
from lowbit.evaluation.metrics import linear_bits_per_weight
from lowbit.inference.generate import generate
from lowbit.kernels.cpu import use_cpu_kernels
from lowbit.methods.rtn import RTNConfig
from lowbit.models.architectures import architecture_for
from lowbit.models.loading import LoadedModel
from lowbit.pipeline import quantize_model

VARIANTS = ("float32", "float32 eager", "bf16", "W8", "W4", "W4A8", "W4 h8", "W4 h8 eager", "W4A8 h8", "W4 ref")
EAGER = " eager"
LLAMA_CPP = " llama.cpp"
GGUF_VARIANTS = ("Q4_0", "Q4_0 llama.cpp", "Q8_0", "Q8_0 llama.cpp")


@dataclass
class LlamaCppRun:
    """One timed greedy generation in llama.cpp (the fields `Generation` gives for lowbit's)."""

    tokens: list[int]
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.decode_seconds if self.decode_seconds > 0 else float("nan")


class LlamaCppDecoder:
    """llama.cpp (llama-cpp-python) over one GGUF file, decoding greedily token by token as
    lowbit's `generate` does: the prompt in one batch (prefill, which yields the first new
    token), then one `eval` per token, timed separately."""

    def __init__(self, path: Path, ctx: int, threads: int):
        from lowbit.engines.llama_cpp import open_model

        self.llm = open_model(path, ctx=ctx, threads=threads, logits_all=False)

    def generate(self, prompt: list[int], new_tokens: int) -> LlamaCppRun:
        llm = self.llm
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        tokens = [self._best()]
        prefilled = time.perf_counter()
        while len(tokens) < new_tokens:
            llm.eval(tokens[-1:])
            tokens.append(self._best())
        return LlamaCppRun(tokens, prefilled - start, time.perf_counter() - prefilled)

    def _best(self) -> int:
        """The argmax of the last position's logits, read from llama.cpp's context (the
        binding copies logits into ``scores`` only with logits_all, which would also make the
        prefill compute every position's)."""
        import llama_cpp
        import numpy as np

        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.llm.n_vocab(),))
        return int(np.argmax(logits))


def build_gguf_variant(loaded: LoadedModel, variant: str, work: Path) -> tuple[nn.Module, Path]:
    """``loaded`` quantised to ``variant``'s GGML type ("Q4_0", "Q8_0"), exported to ``work``, and opened back
    from the file with the file's head codes and int8 activations (see the module docstring):
    the lowbit model and the file llama.cpp reads."""
    from lowbit.interchange.gguf import export, head_from_file, open_quantized
    from lowbit.numerics.spec import QuantSpec

    fmt = variant.lower()
    quantised = copy.deepcopy(loaded)
    quantize_model(quantised, RTNConfig(spec=QuantSpec().with_changes(format=fmt)), progress=False)
    path, _ = export(quantised, work / f"{fmt}.gguf")
    del quantised
    model = open_quantized(path).model
    head_from_file(model, path)
    use_cpu_kernels(model, int8_activations=True, w8a8=True)
    return model, path


def random_llama(hidden: int = 2048, intermediate: int = 5632, layers: int = 22, heads: int = 32, kv_heads: int = 4, vocab: int = 32000, seed: int = 0) -> nn.Module:
    """A Llama-shaped model with random weights (TinyLlama-1.1B's shape by default): 1.1 B
    parameters whose 4.4 GB of float32 weights dominate every decode step's memory traffic."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, vocab_size=vocab, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(config)
    return model.eval()


def write_llama_gguf(model: nn.Module, path: Path) -> Path:
    """A float32 GGUF file of a Llama-architecture model that has none (the random 1.1B
    model), so that it can be exported and run in llama.cpp as the packaged models are: the
    hyper-parameters from its config, its tensors under llama.cpp's names (q and k rows in
    llama.cpp's RoPE order, `qk_permutation`), and a placeholder SentencePiece-style
    vocabulary of ``vocab_size`` entries (<unk>, <s>, </s>, the 256 byte tokens, then "▁t<i>"):
    enough for both engines to load it; its text is meaningless, as the weights are."""
    import gguf

    from lowbit.interchange.gguf import qk_permutation

    config = model.config
    if config.model_type != "llama" or config.vocab_size < 260:
        raise ValueError(f"write_llama_gguf takes a Llama model with at least 260 tokens, not {config.model_type} with {config.vocab_size}")
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]) if getattr(config, "rope_parameters", None) else 10000.0)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    n = config.vocab_size
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256)), *(f"\u2581t{i}" for i in range(n - 259))])
    writer.add_token_scores([0.0] * n)
    writer.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL, *[gguf.TokenType.BYTE] * 256,
                            *[gguf.TokenType.NORMAL] * (n - 259)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    tensors = {name: value.detach().float().numpy() for name, value in model.state_dict().items()}
    head = tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("token_embd.weight", tensors["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", tensors["model.norm.weight"])
    writer.add_tensor("output.weight", head)
    names = {"input_layernorm": "attn_norm", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        for ours, heads, theirs in (("self_attn.q_proj", config.num_attention_heads, "attn_q"), ("self_attn.k_proj", config.num_key_value_heads, "attn_k")):
            weight = tensors[f"{prefix}{ours}.weight"]
            writer.add_tensor(f"blk.{i}.{theirs}.weight", weight[qk_permutation(weight.shape[0], heads).numpy()])
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{theirs}.weight", tensors[f"{prefix}{ours}.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_variant(model: nn.Module, variant: str) -> nn.Module:
    """A new model for ``variant`` (float32 returns ``model`` itself; " eager" changes how it
    decodes, not what is built)."""
    variant = variant.removesuffix(EAGER)
    if variant == "float32":
        return model
    if variant == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    copy_ = copy.deepcopy(model)
    loaded = LoadedModel(model=copy_, tokenizer=None, source="speed", arch=architecture_for(copy_.config.model_type))
    config = RTNConfig(spec=VARIANT_SPECS[variant.split()[0]], head=HEAD_VARIANT_SPEC if variant.endswith("h8") else None)
    quantize_model(loaded, config, progress=False)
    if not variant.endswith("ref"):
        use_cpu_kernels(copy_, int8_activations=variant.startswith("W4A8"))
    return copy_


def measure_variants(model: nn.Module, machine: Machine, prompt_len: int = 64, new_tokens: int = 32,
                     variants: tuple[str, ...] = VARIANTS, warmup: int = 4, rounds: int = 3, loaded: LoadedModel | None = None) -> list[SpeedRow]:
    """Decode tokens/s (batch 1, greedy, lean loop) and prefill time of each variant, with
    the roofline's prediction for the same step (context = the middle of the generation).

    All variants are built first and measured in ``rounds`` interleaved rounds (every variant
    once per round), each row the median over rounds: this machine's speed drifts by tens of
    percent over minutes, and measuring one variant after another turned that drift into
    differences between variants. The reference path ("W4 ref"), ~100x slower, runs in the
    first round only. `GGUF_VARIANTS` need ``loaded`` (the model as loaded from its GGUF
    file, for the export's metadata and tokenizer); a llama.cpp row's bytes per token are
    its lowbit twin's (the same file; lowbit's kernels hold float32 scales, so the file holds
    a little less), its prefill time llama.cpp's own."""
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    built, files, engines = {}, {}, {}
    work = Path(tempfile.mkdtemp(prefix="lowbit-speed-")) if any(v in GGUF_VARIANTS for v in variants) else None
    try:
        for variant in sorted(variants, key=lambda v: v not in GGUF_VARIANTS):  # the exports' float copies first, while little else is held
            base = variant.removesuffix(EAGER).removesuffix(LLAMA_CPP)
            if base in built:
                built[variant] = built[base]
            elif variant in GGUF_VARIANTS:
                if loaded is None:
                    raise ValueError(f"{variant} needs the model as loaded from its GGUF file (loaded=...)")
                built[base], files[base] = build_gguf_variant(loaded, base, work)
                built[variant] = built[base]
            else:
                built[variant] = build_variant(model, base)
            if variant.endswith(LLAMA_CPP):
                engines[variant] = LlamaCppDecoder(files[base], ctx=prompt_len + new_tokens + 8, threads=torch.get_num_threads())

        def decode(variant: str, ids: torch.Tensor, tokens: int):
            if variant in engines:
                time.sleep(0.5)  # torch's threads stop spinning first: llama.cpp's collapse on shared cores
                return engines[variant].generate(ids[0].tolist(), tokens)
            compiled = False if variant.endswith((EAGER, "ref")) or variant == "bf16" else None
            return generate(built[variant], ids, max_new_tokens=tokens, compiled=compiled)

        for variant in variants:
            decode(variant, prompt[:, :8], warmup)  # warm caches, allocators, kernels
        runs = {variant: [] for variant in variants}
        for round_ in range(rounds):
            for variant in variants:
                if round_ == 0 or not variant.endswith("ref"):
                    runs[variant].append(decode(variant, prompt, new_tokens))
        rows = []
        for variant in variants:
            variant_model = built[variant]
            step = decode_cost(variant_model, prompt_len + new_tokens // 2)
            prefill = prefill_cost(variant_model, prompt_len)
            rows.append(SpeedRow(variant, linear_bits_per_weight(variant_model), step.weight_bytes,
                                 statistics.median(r.decode_tokens_per_second for r in runs[variant]), 1.0 / step.seconds(machine),
                                 statistics.median(r.prefill_seconds for r in runs[variant]), prefill.seconds(machine), step.intensity,
                                 step.bound(machine), len(runs[variant])))
    finally:  # also after an error: the exported files and their float conversions (`open_quantized` cached one each)
        built.clear()
        engines.clear()
        gc.collect()
        if work is not None:
            from lowbit.models.loading import remove_gguf_directory

            remove_gguf_directory(work)
    return rows
