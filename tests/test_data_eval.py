"""Corpora, windows, and the evaluation metrics."""

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import TEXT, byte_tokenizer, tiny_llama
from lowbit import QuantSpec, RTNConfig, evaluate, load_model, quantize_model
from lowbit.data import calibration_samples, eval_windows, load_text, tokenize_split
from lowbit.errors import LowbitError


def test_pydoc_corpus_is_available():
    label, text = load_text("pydoc")
    assert label == "pydoc" and len(text.split()) > 50_000


def test_unknown_corpus_and_missing_file():
    with pytest.raises(LowbitError, match="unknown"):
        load_text("wikitext")
    with pytest.raises(LowbitError, match="not found"):
        load_text(text_file="/no/such/file.txt")


def test_calibration_and_evaluation_are_disjoint(text_file):
    tok = byte_tokenizer()
    split = tokenize_split(tok, text_file=text_file)
    assert len(split.calibration) + len(split.evaluation) == len(tok(TEXT, add_special_tokens=False).input_ids)
    windows = eval_windows(split, ctx=64)
    samples = calibration_samples(split, n_samples=8, ctx=64, seed=0)
    n = len(split.calibration)
    whole = torch.cat([split.calibration, split.evaluation])
    # every evaluation window lies after the cut, every calibration sample before it
    for w in windows:
        start = next(i for i in range(n, len(whole) - 63) if torch.equal(whole[i : i + 64], w))
        assert start >= n
    for s in samples:
        assert any(torch.equal(split.calibration[i : i + 64], s) for i in range(n - 63))


def test_windows_are_deterministic_and_bos_prefixed(text_file):
    tok = byte_tokenizer(bos=True)
    split = tokenize_split(tok, text_file=text_file)
    assert split.bos_id == 256
    a, b = eval_windows(split, ctx=32, n_windows=3), eval_windows(split, ctx=32, n_windows=3)
    assert torch.equal(a, b) and a.shape == (3, 32)
    assert (a[:, 0] == 256).all() and not (a[:, 1:] == 256).any()
    assert torch.equal(a[0, 1:], split.evaluation[:31])  # BOS + ctx-1 text tokens
    s1, s2 = calibration_samples(split, 4, 32, seed=1), calibration_samples(split, 4, 32, seed=1)
    assert torch.equal(s1, s2) and (s1[:, 0] == 256).all()
    assert not torch.equal(s1, calibration_samples(split, 4, 32, seed=2))


def test_text_too_short_for_a_window(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("too short")
    split = tokenize_split(byte_tokenizer(), text_file=short)
    with pytest.raises(LowbitError, match="fewer than one window of 512"):
        eval_windows(split, ctx=512)


def test_too_many_windows(text_file):
    split = tokenize_split(byte_tokenizer(), text_file=text_file)
    with pytest.raises(LowbitError, match="has room for"):
        eval_windows(split, ctx=256, n_windows=10_000)


def test_perplexity_kld_and_top1_match_their_definitions():
    torch.manual_seed(0)
    ref, other = tiny_llama(seed=1), tiny_llama(seed=2)
    windows = torch.randint(0, 256, (3, 20))
    results = evaluate({"ref": ref, "other": other}, windows, reference=ref, progress=False)
    by = {r.label: r for r in results}
    assert by["ref"].kld == pytest.approx(0.0, abs=1e-7) and by["ref"].top1_percent == 100.0
    nll = kld = agree = 0.0
    with torch.no_grad():
        for w in windows:
            lp_ref = F.log_softmax(ref(w[None, :-1]).logits[0], -1)
            lp = F.log_softmax(other(w[None, :-1]).logits[0], -1)
            nll -= lp.gather(-1, w[1:, None]).sum().item()
            kld += (lp_ref.exp() * (lp_ref - lp)).sum().item()
            agree += (lp.argmax(-1) == lp_ref.argmax(-1)).sum().item()
    assert by["other"].tokens == 3 * 19
    assert by["other"].perplexity == pytest.approx(math.exp(nll / 57), rel=1e-5)
    assert by["other"].kld == pytest.approx(kld / 57, rel=1e-4)
    assert by["other"].top1_percent == pytest.approx(100 * agree / 57)
    # a random model is close to uniform over 257 tokens
    assert 150 < by["other"].perplexity < 400


def test_the_reference_cache_gives_the_same_scores_and_misses_on_any_change(tmp_path, monkeypatch):
    """The stored hidden states stand in for the reference's forward passes: the scores equal
    an uncached evaluation's exactly, the second run does not call the reference's body, and
    another weight or other windows get a file of their own."""
    from lowbit.evaluation import metrics

    ref, other = tiny_llama(seed=1), tiny_llama(seed=2)
    windows = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(0))
    plain = evaluate({"ref": ref, "other": other}, windows, reference=ref, progress=False)
    first = evaluate({"ref": ref, "other": other}, windows, reference=ref, progress=False, reference_cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    forwards = []
    real = metrics.final_hidden_states
    monkeypatch.setattr(metrics, "final_hidden_states", lambda model, inputs: forwards.append(model) or real(model, inputs))
    second = evaluate({"ref": ref, "other": other}, windows, reference=ref, progress=False, reference_cache=tmp_path)
    assert all(model is other for model in forwards) and len(forwards) == 3  # only the candidate ran
    for a, b, c in zip(plain, first, second):
        assert (a.perplexity, a.kld, a.top1_percent) == (b.perplexity, b.kld, b.top1_percent) == (c.perplexity, c.kld, c.top1_percent)
    evaluate({"other": other}, windows[:2], reference=ref, progress=False, reference_cache=tmp_path)
    with torch.no_grad():
        ref.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    changed = evaluate({"ref": ref, "other": other}, windows, reference=ref, progress=False, reference_cache=tmp_path)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert changed[1].kld != first[1].kld


def test_quantisation_error_grows_as_bits_fall(tiny_llama_dir, text_file):
    ref = load_model(str(tiny_llama_dir))
    split = tokenize_split(ref.tokenizer, text_file=text_file)
    windows = eval_windows(split, ctx=64, n_windows=4)
    models = {"float": ref.model}
    for bits in (8, 4, 2):
        loaded = load_model(str(tiny_llama_dir))
        quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=bits, granularity="channel", group_size=None)), progress=False)
        models[f"w{bits}"] = loaded.model
    by = {r.label: r for r in evaluate(models, windows, reference=ref.model, progress=False)}
    assert by["w8"].kld < by["w4"].kld < by["w2"].kld
    assert by["w8"].top1_percent >= by["w2"].top1_percent
    assert by["float"].bits_per_weight == 32 and by["w4"].bits_per_weight == pytest.approx(4 + 16 / 64, rel=0.05)
    assert by["w2"].model_bytes < by["w4"].model_bytes < by["w8"].model_bytes < by["float"].model_bytes


def test_head_check_tolerates_rounding_at_large_logits_and_catches_a_wrong_head():
    """A collapsed low-bit model has logits in the hundreds, where float32 rounding between
    the full forward and the chunked head (different BLAS blockings; seen on Gemma 3 at 2
    bits) exceeds 1e-4: simulated here by a 1e-5 relative perturbation of the hidden
    states (log-probabilities move by ~4e-3), it must not stop the evaluation; a head that is not the model's (a soft-cap
    the forward never applies) must."""
    from lowbit.evaluation.metrics import _check_chunked_head, final_hidden_states, log_probs_into

    model = tiny_llama(seed=4)
    with torch.no_grad():
        model.lm_head.weight.mul_(300.0)
    inputs = torch.randint(0, 256, (1, 64), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hidden = final_hidden_states(model, inputs)
        assert model(inputs).logits.abs().max() > 100
        g = torch.Generator().manual_seed(5)
        rounded = hidden * (1 + 1e-5 * torch.randn(hidden.shape, generator=g))
        moved = (log_probs_into(model, rounded, torch.empty(64, model.config.vocab_size)) - log_probs_into(model, hidden, torch.empty(64, model.config.vocab_size))).abs().max()
        assert moved > 1e-3
        _check_chunked_head(model, inputs, rounded)
        model.config.final_logit_softcapping = 5.0
        with pytest.raises(LowbitError, match="differ by up to"):
            _check_chunked_head(model, inputs, hidden)


def test_the_mix_calibration_corpus_interleaves_equal_shares_of_every_corpus(monkeypatch):
    """--calib-corpus mix: sample i comes from corpus i mod 2 (pydoc, shakespeare), each
    the samples that corpus alone would give at the same seed (two short stand-in texts)."""
    from lowbit.calibration.config import CalibrationConfig
    from lowbit.data.texts import CORPORA

    monkeypatch.setitem(CORPORA, "pydoc", lambda: TEXT)
    monkeypatch.setitem(CORPORA, "shakespeare", lambda: "To be, or not to be, that is the question. " * 60)
    tok = byte_tokenizer()
    mixed = CalibrationConfig(corpus="mix", samples=5, ctx=32).tokens(tok)
    pydoc = CalibrationConfig(corpus="pydoc", samples=3, ctx=32).tokens(tok)
    plays = CalibrationConfig(corpus="shakespeare", samples=2, ctx=32).tokens(tok)
    assert mixed.shape == (5, 32) and not torch.equal(pydoc[:2], plays)
    assert torch.equal(mixed[0::2], pydoc) and torch.equal(mixed[1::2], plays)
    assert CalibrationConfig(corpus="mix").to_dict()["corpus"] == "mix"
