"""GGUF export, checked by llama.cpp (llama-cpp-python) and by the gguf package.

What counts: llama.cpp loads the exported file and computes what lowbit computes from the
same checkpoint. Its CPU dot products round activations to 8 bits, so logits differ a
little even for identical weights; the tolerance is measured, not guessed: llama.cpp's
disagreement with lowbit on the *source* GGUF (whose weights lowbit reads bit for bit) is
the engine's own margin, and an export may not disagree by more than 1.5 times it. Broken
files (a flipped code byte, a wrong RoPE base, q/k rows in the wrong order) fail these
checks: tested below.

Needs llama-cpp-python (scripts/install-llama-cpp.sh); skipped without it, except under
LOWBIT_REQUIRE_LLAMA_CPP=1 (CI), where its absence fails.
"""

import copy
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from lowbit.calibration.config import CalibrationConfig
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.interchange import gguf as export_gguf
from lowbit.methods import AWQConfig, GPTQConfig, RTNConfig
from lowbit.models.loading import gguf_reader
from lowbit.modules.quant_linear import QuantLinear
from lowbit.numerics.ggml_types import GGML_TYPES
from lowbit.numerics.spec import QuantSpec
from lowbit.pipeline import quantize_model

WINDOWS, CTX = 2, 128
PROMPT = "The capital of France is"
ENGINE_MARGIN = 1.5  # an export may disagree with lowbit at most this many times the source file does
# ... except at 2 bits, where llama.cpp's 8-bit activations move the (much less certain)
# logits of a far noisier model more: q2_k measured 1.99 times the margin, perplexity +3.1%
LOW_BIT_MARGIN, LOW_BIT_TYPES = 2.5, ("q2_k",)
TIE = 1.0  # logits: a greedy choice of llama.cpp that is not lowbit's must be this close to lowbit's best


@pytest.fixture(scope="module")
def llama():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("LOWBIT_REQUIRE_LLAMA_CPP") == "1":
            pytest.fail("LOWBIT_REQUIRE_LLAMA_CPP=1 but llama-cpp-python is not installed (scripts/install-llama-cpp.sh)")
        pytest.skip("llama-cpp-python is not installed (scripts/install-llama-cpp.sh)")
    from lowbit.engines import llama_cpp

    return llama_cpp


_FLOAT = {}


def float_model(name, packaged_gguf):
    packaged_gguf(name)
    if name not in _FLOAT:
        from lowbit.loader import load_model

        _FLOAT[name] = load_model(name)
    return _FLOAT[name]


def windows(loaded):
    import pydoc_data.topics

    text = "\n".join(pydoc_data.topics.topics.values())[:20000]
    ids = loaded.tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = [loaded.tokenizer.bos_token_id] if loaded.model.config.model_type.startswith("gemma") else []
    size = CTX - len(bos)
    return [bos + ids[i * size:(i + 1) * size] for i in range(WINDOWS)]


def lowbit_logits(loaded, ids):
    with torch.no_grad():
        return loaded.model(torch.tensor([ids])).logits[0].float().numpy()


def disagreement(llama, loaded, path) -> dict:
    """llama.cpp on ``path`` against lowbit's ``loaded``: RMS logit difference over the
    logits' spread, perplexity ratio, and the teacher-forced greedy check."""
    # one thread beside another test worker: llama.cpp's threads spin at every barrier, and
    # with the cores shared they wait for a thread that is not running
    engine = llama.open_model(path, ctx=CTX + 40, threads=1 if os.environ.get("PYTEST_XDIST_WORKER") else None)
    sq, spread, nll_l, nll_o, count = 0.0, 0.0, 0.0, 0.0, 0
    for ids in windows(loaded):
        theirs, ours = llama.logits(engine, ids), lowbit_logits(loaded, ids)
        sq += float(((theirs - ours) ** 2).mean())
        spread += float(ours.var())
        targets = np.array(ids[1:])
        for lg, acc in ((theirs, "l"), (ours, "o")):
            shifted = lg[:-1] - lg[:-1].max(-1, keepdims=True)
            logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
            value = -logp[np.arange(len(targets)), targets].sum()
            if acc == "l":
                nll_l += value
            else:
                nll_o += value
        count += len(targets)
    bos = [loaded.tokenizer.bos_token_id] if loaded.model.config.model_type.startswith("gemma") else []
    prompt = bos + loaded.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    generated = llama.greedy(engine, prompt, 32)
    ours = lowbit_logits(loaded, prompt + generated)[len(prompt) - 1:-1]  # lowbit's view of each of llama.cpp's choices
    gaps = ours.max(-1) - ours[np.arange(len(generated)), generated]
    exact = next((i for i, gap in enumerate(gaps) if gap > 0), len(gaps))
    return {"rel_rms": (sq / spread) ** 0.5, "ppl_ratio": float(np.exp((nll_l - nll_o) / count)), "worst_gap": float(gaps.max()),
            "exact_tokens": exact}


@pytest.fixture(scope="module")
def margins(llama, packaged_gguf):
    """llama.cpp vs lowbit on each packaged file itself: the engine's own disagreement."""
    out = {}
    for name in ("smollm2", "gemma3-270m"):
        out[name] = disagreement(llama, float_model(name, packaged_gguf), packaged_gguf(name))
    return out


def quantised(name, config, packaged_gguf, calibration=None):
    loaded = copy.deepcopy(float_model(name, packaged_gguf))
    quantize_model(loaded, config, calibration=calibration, progress=False)
    return loaded


# Every block type in one SmolLM2 file: block i of the 30 takes MIXED_TYPES[i % 10] (a
# K-quant only in down_proj, whose 1536-weight rows hold its 256-blocks; the other linears
# of those blocks take llama.cpp's fallback). One export, one check of every tensor's codes
# and one llama.cpp run cover the ten types where a file per type took ten of each (about
# 4 minutes of CI). q2_k goes alone: its looser margin would hide the others' errors.
MIXED_TYPES = tuple(name for name in GGML_TYPES if name not in LOW_BIT_TYPES)
EXPORT_CASES = ("mixed", *LOW_BIT_TYPES)
_RTN = {}


def rtn_config(case: str) -> RTNConfig:
    if case != "mixed":
        return RTNConfig(spec=QuantSpec().with_changes(format=case))
    per_block = tuple((rf"layers\.({'|'.join(str(b) for b in range(i, 30, len(MIXED_TYPES)))})\.", fmt)
                      for i, fmt in enumerate(MIXED_TYPES))
    return RTNConfig(spec=QuantSpec().with_changes(format=MIXED_TYPES[0]), layer_formats=per_block)


def rtn_smollm2(case: str, packaged_gguf):
    """SmolLM2 rounded to nearest in ``case`` (a GGML type, or "mixed"), quantised once per
    module and shared by the tests that only read it."""
    if case not in _RTN:
        _RTN[case] = quantised("smollm2", rtn_config(case), packaged_gguf)
    return _RTN[case]


def check_codes(loaded, path):
    """Every tensor the export wrote from codes decodes, by the gguf package, to exactly
    lowbit's dequantised weight (rows in llama.cpp's order)."""
    reader = gguf_reader(path)
    by_name = {t.name: t for t in reader.tensors}
    config = loaded.model.config.get_text_config(decoder=True)
    modules = export_gguf._modules_by_gguf_name(loaded.model, reader.fields["general.architecture"].contents(), config.num_hidden_layers)
    checked = 0
    for base, (module_name, module) in modules.items():
        if not isinstance(module, QuantLinear):
            continue
        tensor = by_name[f"{base}.weight"]
        decoded = np.asarray(gguf_dequantize(np.asarray(tensor.data), tensor.tensor_type), dtype=np.float32)
        ours = module.qweight.dequantize()
        rows = export_gguf._row_order(base, loaded.arch, config)
        if rows is not None:
            ours = ours[rows]
        if not np.array_equal(decoded.view(np.uint32), ours.numpy().view(np.uint32)):
            return False
        checked += 1
    return checked > 0


def assert_matches(result, margin, fmt=None):
    print("disagreement", result, "engine margin", margin)
    low = fmt in LOW_BIT_TYPES
    assert result["rel_rms"] <= (LOW_BIT_MARGIN if low else ENGINE_MARGIN) * margin["rel_rms"], (result, margin)
    assert abs(result["ppl_ratio"] - 1) <= (0.05 if low else 0.03), result
    assert result["worst_gap"] <= TIE, result


def test_the_engine_margin_is_small(margins):
    """The tolerance itself is tight: on the packaged files llama.cpp and lowbit agree to a
    few percent of the logits' spread and within 1% perplexity."""
    for margin in margins.values():
        assert margin["rel_rms"] < 0.1 and abs(margin["ppl_ratio"] - 1) < 0.01, margins


@pytest.mark.parametrize("case", EXPORT_CASES)
def test_rtn_export_of_every_type_runs_in_llama_cpp_as_in_lowbit(case, llama, margins, packaged_gguf, tmp_path):
    loaded = rtn_smollm2(case, packaged_gguf)
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf")
    assert plan.counts()["codes"] == 210
    assert check_codes(loaded, path)
    written = {t.tensor_type.name.lower() for t in gguf_reader(path).tensors if t.name.startswith("blk.")}
    assert written >= (set(MIXED_TYPES) if case == "mixed" else {case}), written
    assert_matches(disagreement(llama, loaded, path), margins["smollm2"], case)


def test_gptq_k_quant_export_holds_the_codes_gptq_chose(llama, margins, packaged_gguf, tmp_path):
    """16 x 128 calibration tokens, more than down_proj's 1536 inputs: with 4 x 128 GPTQ's
    Hessians are rank-deficient and the model it makes fits its calibration text so closely
    that llama.cpp's 8-bit activations alone moved its perplexity by 3.5% (0.1% here)."""
    config = GPTQConfig(spec=QuantSpec().with_changes(format="q4_k"), layer_formats=(("down_proj", "q6_k"),))
    loaded = quantised("smollm2", config, packaged_gguf, CalibrationConfig(samples=16, ctx=128))
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf")
    assert check_codes(loaded, path)
    types = {t.name: t.tensor_type.name for t in gguf_reader(path).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.0.attn_q.weight"] == "Q5_0"
    assert_matches(disagreement(llama, loaded, path), margins["smollm2"])


def test_gemma_awq_export_writes_k_quants_and_its_folded_norms_with_gemmas_offset(llama, margins, packaged_gguf, tmp_path):
    """One Gemma 3 file (each Gemma export costs a load, a 262k-token vocabulary parsed
    twice and a llama.cpp run): AWQ in q4_0, down_proj (rows of 2048 weights, whole
    256-blocks) in q6_k in the even blocks and q4_k in the odd ones. AWQ folds its scales
    into the norms: those go out as float32 (+1 for Gemma), the other float tensors as the
    source's bytes. (In q4_k throughout, Gemma's rows of 640 weights take the fallback q5_0,
    at which AWQ's grid kept every norm as it was: nothing folded to check.)"""
    config = AWQConfig(spec=QuantSpec().with_changes(format="q4_0"), grid=4,
                       layer_formats=((r"layers\.\d*[02468]\.mlp\.down_proj", "q6_k"), (r"mlp\.down_proj", "q4_k")))
    loaded = quantised("gemma3-270m", config, packaged_gguf, CalibrationConfig(samples=4, ctx=128))
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf")
    assert check_codes(loaded, path)
    types = {t.name: t.tensor_type.name for t in gguf_reader(path).tensors}
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"], types["blk.0.attn_q.weight"]) == ("Q6_K", "Q4_K", "Q4_0")
    floats = {t.name for t in plan.tensors if t.origin == "float"}
    assert floats and all("norm" in name for name in floats)
    assert "token_embd.weight" in {t.name for t in plan.tensors if t.origin == "source"}
    assert_matches(disagreement(llama, loaded, path), margins["gemma3-270m"])


def test_a_flipped_code_byte_is_caught(packaged_gguf, tmp_path):
    loaded = rtn_smollm2("q4_0", packaged_gguf)
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf")
    tensor = next(t for t in gguf_reader(path).tensors if t.name == "blk.3.attn_v.weight")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset + 5] ^= 0x10  # one code of one weight
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(bytes(data))
    assert check_codes(loaded, path) and not check_codes(loaded, broken)


def test_wrong_metadata_or_row_order_is_caught_by_llama_cpp(llama, margins, packaged_gguf, tmp_path, monkeypatch):
    loaded = rtn_smollm2("q8_0", packaged_gguf)
    plan = export_gguf.plan_gguf(loaded)
    plan.fields = [(k, 10000.0 if k == "llama.rope.freq_base" else v, t, s) for k, v, t, s in plan.fields]
    wrong_rope = export_gguf.write_gguf(plan, tmp_path / "rope.gguf")
    monkeypatch.setattr(export_gguf, "_row_order", lambda *args: None)
    unpermuted, _ = export_gguf.export(loaded, tmp_path / "rows.gguf")
    for path in (wrong_rope, unpermuted):
        result = disagreement(llama, loaded, path)
        assert result["rel_rms"] > 2 * ENGINE_MARGIN * margins["smollm2"]["rel_rms"], result


def test_a_format_no_gguf_type_holds_is_refused_before_writing(packaged_gguf, tmp_path, capsys):
    loaded = quantised("smollm2", RTNConfig(spec=QuantSpec(bits=4, group_size=64)), packaged_gguf)
    with pytest.raises(LowbitError, match=r"--format q4_0 or q4_1 or iq4_nl or q4_k.*--requantize"):
        export_gguf.export(loaded, tmp_path / "model.gguf")
    assert not list(tmp_path.iterdir())
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf", requantize=True)
    assert plan.counts()["requantized"] == 210 and all("dB" in t.note for t in plan.tensors if t.origin == "requantized")


def test_plain_int4_g32_exports_code_for_code_as_q4_0(packaged_gguf, tmp_path):
    loaded = quantised("smollm2", RTNConfig(spec=QuantSpec(bits=4, group_size=32, grid="full")), packaged_gguf)
    path, plan = export_gguf.export(loaded, tmp_path / "model.gguf")
    assert plan.counts()["codes"] == 210 and plan.file_type == "MOSTLY_Q4_0"
    assert check_codes(loaded, path)


def test_cli_export_refuses_a_non_checkpoint_and_writes_nothing(packaged_gguf, tmp_path, capsys):
    packaged_gguf("smollm2")
    assert main(["export", "smollm2", "--to", "gguf", "--out", str(tmp_path / "x.gguf")]) == 2
    assert "packaged model's name" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


def test_round_trip_lowbit_gguf_lowbit_keeps_every_code(packaged_gguf, tmp_path):
    """lowbit -> GGUF -> lowbit (the file opened as a quantised model): the same codes and
    scales in every layer, in each of the ten types of the mixed file, and exporting that
    again writes the same tensors."""
    loaded = rtn_smollm2("mixed", packaged_gguf)
    path, _ = export_gguf.export(loaded, tmp_path / "a.gguf")
    reopened = export_gguf.open_quantized(path)
    ours = {n: m for n, m in loaded.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in reopened.model.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and len(ours) == 210
    for name, module in ours.items():
        a, b = module.qweight.to_quantized(), theirs[name].qweight.to_quantized()
        assert a.spec == b.spec and torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale), name
    again, _ = export_gguf.export(reopened, tmp_path / "b.gguf")
    first = {t.name: np.asarray(t.data) for t in gguf_reader(path).tensors}
    second = {t.name: np.asarray(t.data) for t in gguf_reader(again).tensors}
    assert first.keys() == second.keys() and all(np.array_equal(first[k], second[k]) for k in first)


def test_a_file_from_a_newer_exporter_is_refused_with_one_line(packaged_gguf, tmp_path, monkeypatch):
    loaded = rtn_smollm2("q8_0", packaged_gguf)
    monkeypatch.setattr(export_gguf, "EXPORT_VERSION", 99)
    path, _ = export_gguf.export(loaded, tmp_path / "new.gguf")
    monkeypatch.setattr(export_gguf, "EXPORT_VERSION", 1)
    with pytest.raises(LowbitError, match="newer lowbit"):
        export_gguf.open_quantized(path)


def test_cli_eval_and_generate_run_an_exported_gguf_as_the_quantised_model(packaged_gguf, tmp_path, capsys):
    """`lowbit eval FILE.gguf` opens the file's codes as QuantLinear (no float copy first):
    the same perplexity, KLD and agreement as the lowbit checkpoint it came from, against
    the float source its lowbit.source record names; `generate` writes the same text."""
    import json

    from lowbit.checkpoint import save_quantized

    loaded = rtn_smollm2("q4_0", packaged_gguf)
    directory = save_quantized(loaded, tmp_path / "q")
    path, _ = export_gguf.export(loaded, tmp_path / "q.gguf")
    scores = {}
    for ref in (directory, path):
        assert main(["eval", str(ref), "--windows", "1", "--ctx", "64", "--json", str(tmp_path / f"{ref.name}.json")]) == 0
        scores[ref.name] = json.loads((tmp_path / f"{ref.name}.json").read_text())
    assert "opened" in capsys.readouterr().err
    a, b = scores["q"], scores["q.gguf"]
    assert a["reference"] == b["reference"] == "smollm2"
    assert (a["perplexity"], a["kld"], a["top1_percent"]) == (b["perplexity"], b["kld"], b["top1_percent"]) and b["kld"] > 0
    texts = []
    for ref in (directory, path):
        assert main(["generate", str(ref), "--prompt", "The capital of France is", "--max-new-tokens", "8"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0]) > len("The capital of France is")
    assert main(["info", str(path)]) == 0
    assert "quantised by lowbit from: smollm2" in capsys.readouterr().out


def test_bench_decode_runs_the_same_file_in_llama_cpp(llama, packaged_gguf, tmp_path):
    """bench-decode's llama.cpp rows: lowbit's twin reads the exported file's codes (head
    included) with int8 activations, llama.cpp decodes the same file greedily token by token
    (the same tokens as llama-cpp-python's own greedy generate), and one interleaved
    measurement gives both rows, priced at the same bytes, with the ratio in the table."""
    from lowbit.analysis.roofline import Machine
    from lowbit.analysis.roofline_report import roofline_table
    from lowbit.inference.speed import LlamaCppDecoder, build_gguf_variant, measure_variants
    from lowbit.kernels.cpu import KernelLinear
    from lowbit.loader import load_model
    from lowbit.models.registry import cache_dir

    packaged_gguf("smollm2")
    loaded = load_model("smollm2")
    twin, path = build_gguf_variant(loaded, "Q8_0", tmp_path)
    kernels = [m for m in twin.modules() if isinstance(m, KernelLinear)]
    assert len(kernels) == 7 * twin.config.num_hidden_layers + 1 and all(k.int8_activations for k in kernels)
    assert isinstance(twin.lm_head, KernelLinear) and twin.lm_head.reference.qweight.spec.format == "q8_0"
    prompt = loaded.tokenizer("The quick brown fox jumps over the lazy").input_ids
    decoder = LlamaCppDecoder(path, ctx=64, threads=2)
    run = decoder.generate(prompt, 8)
    assert run.tokens == llama.greedy(decoder.llm, prompt, 8)
    assert run.prefill_seconds > 0 and run.decode_tokens_per_second > 0
    rows = {r.variant: r for r in measure_variants(loaded.model, Machine(bandwidth_gbps=20, peak_gflops=100), prompt_len=8, new_tokens=4,
                                                   variants=("Q8_0", "Q8_0 llama.cpp"), warmup=2, rounds=1, loaded=loaded)}
    assert rows["Q8_0"].weight_bytes == rows["Q8_0 llama.cpp"].weight_bytes
    assert all(r.decode_tokens_per_second > 0 and r.rounds == 1 for r in rows.values())
    ratio = rows["Q8_0"].decode_tokens_per_second / rows["Q8_0 llama.cpp"].decode_tokens_per_second
    line = next(line for line in roofline_table(list(rows.values())).splitlines() if line.startswith("Q8_0 "))
    assert f"{ratio:.2f}" in line.split()
    exports = str(Path(tempfile.gettempdir()) / "lowbit-speed-")
    left = [entry for entry in (cache_dir() / "converted").iterdir() if (entry / "lowbit-source.json").is_file()
            and json.loads((entry / "lowbit-source.json").read_text())["gguf"].startswith(exports)]
    assert not left  # the export's float conversion went with the file


def test_a_random_llama_written_as_gguf_loads_in_both_engines(llama, tmp_path):
    """bench-decode's 1.1B model has no file: `write_llama_gguf` writes one (llama.cpp's names
    and q/k row order, a placeholder vocabulary) that lowbit's loader reads back to the same
    logits and llama.cpp runs to the same logits within float32 rounding; an exported Q8_0
    copy then decodes in llama.cpp like the packaged models' files."""
    from lowbit.inference.speed import random_llama, write_llama_gguf
    from lowbit.loader import load_model

    model = random_llama(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=512)
    loaded = load_model(str(write_llama_gguf(model, tmp_path / "random.gguf")))
    ids = torch.randint(3, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids).logits[0]
        assert torch.equal(loaded.model(ids).logits[0], expected)
    engine = llama.open_model(tmp_path / "random.gguf", ctx=64, threads=1)
    got = torch.from_numpy(llama.logits(engine, ids[0].tolist()))
    assert (got - expected).abs().max() < 2e-3 * expected.abs().max()
    quantize_model(loaded, RTNConfig(spec=QuantSpec().with_changes(format="q8_0")), progress=False)
    path, _ = export_gguf.export(loaded, tmp_path / "q8_0.gguf")
    quantised = llama.open_model(path, ctx=64, threads=1)
    q8 = torch.from_numpy(llama.logits(quantised, ids[0].tolist()))
    assert (q8 - expected).norm() < 0.05 * expected.norm()
    from lowbit.cli import _llama_cpp_variants
    from lowbit.inference.speed import GGUF_VARIANTS

    (tmp_path / "cli").mkdir()
    variants, written = _llama_cpp_variants("llama-1b", model, None, True, tmp_path / "cli")  # what bench-decode does for it
    assert variants == GGUF_VARIANTS and written.model.config.num_hidden_layers == 2 and (tmp_path / "cli" / "llama-1b.gguf").is_file()
    assert _llama_cpp_variants("llama-1b", model, None, False, tmp_path / "cli") == ((), None)
    from lowbit.inference.speed import build_gguf_variant

    twin, file = build_gguf_variant(written, "Q4_0", tmp_path / "cli")  # the file's head is float32: the twin keeps its own, the same numbers
    assert type(twin.get_output_embeddings()) is torch.nn.Linear
    with torch.no_grad():
        mine = twin(ids).logits[0]
    theirs = torch.from_numpy(llama.logits(llama.open_model(file, ctx=64, threads=1), ids[0].tolist()))
    assert (mine - theirs).norm() < 0.02 * theirs.norm() and (mine - expected).norm() > (mine - theirs).norm()
    with pytest.raises(ValueError, match="Llama model with at least 260 tokens"):
        write_llama_gguf(random_llama(hidden=64, intermediate=128, layers=1, heads=2, kv_heads=1, vocab=100), tmp_path / "small.gguf")
