"""The lowbit command on the tiny model: verbs, JSON, and one-line errors for bad input."""

import importlib
import json
import subprocess
import sys

import pytest
import torch

from lowbit import read_header
from lowbit.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_quantize_eval_info(capsys, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--asym", "--out", str(out))
    assert code == 0 and "quantised 14 linears" in stdout and out.is_dir()

    report = tmp_path / "r.json"
    code, stdout, _ = run(capsys, "eval", str(out), "--text", str(text_file), "--windows", "2", "--ctx", "64", "--json", str(report))
    assert code == 0
    assert "(reference)" in stdout and "q " in stdout  # before/after rows
    data = json.loads(report.read_text())
    for key in ("perplexity", "kld", "top1_percent", "tokens", "bits_per_weight", "model_bytes"):
        assert key in data
    assert data["tokens"] == 2 * 63 and data["kld"] > 0 and data["reference"] == str(tiny_llama_dir.resolve())
    assert data["bits_per_weight"] == pytest.approx(4 + 16 / 32 + 4 / 32)
    assert [r["label"] for r in data["results"]][1] == "q"

    code, stdout, _ = run(capsys, "info", str(out))
    assert code == 0 and "W4 g32 asym" in stdout and "14 quantised linears" in stdout


def test_eval_reuses_the_reference_hidden_states_unless_told_not_to(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "q"
    assert run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--out", str(out))[0] == 0
    stored = tmp_path / "cache" / "eval-reference"
    scores = []
    for extra in ((), (), ("--no-reference-cache",)):
        report = tmp_path / f"r{len(scores)}.json"
        assert run(capsys, "eval", str(out), "--text", str(text_file), "--windows", "2", "--ctx", "64", "--json", str(report), *extra)[0] == 0
        scores.append({k: json.loads(report.read_text())[k] for k in ("perplexity", "kld", "top1_percent")})
        if not scores[1:]:
            assert len(list(stored.glob("*.safetensors"))) == 1
    assert scores[0] == scores[1] == scores[2]
    assert len(list(stored.glob("*.safetensors"))) == 1
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--out", str(tmp_path / "q2"), "--no-reference-cache")
    assert code == 2 and "--no-reference-cache apply with --eval" in err


def test_eval_scores_several_checkpoints_in_one_pass_as_one_at_a_time(capsys, tiny_llama_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    outs = [tmp_path / "a" / "w4", tmp_path / "b" / "w4", tmp_path / "w2"]  # two alike names keep their full paths
    for out, bits in zip(outs, ("4", "3", "2")):
        assert run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", bits, "--group-size", "32", "--out", str(out))[0] == 0
    eval_args = ("--text", str(text_file), "--windows", "2", "--ctx", "64", "--no-reference-cache")
    alone = []
    for out in outs:
        report = tmp_path / f"{out.parent.name}{out.name}.json"
        assert run(capsys, "eval", str(out), *eval_args, "--json", str(report))[0] == 0
        alone.append(json.loads(report.read_text())["results"][-1])
    report = tmp_path / "all.json"
    code, stdout, _ = run(capsys, "eval", *map(str, outs), *eval_args, "--json", str(report))
    assert code == 0 and stdout.count("(reference)") == 1
    data = json.loads(report.read_text())
    together = data["results"][1:]
    assert [r["label"] for r in together] == ["w4", str(outs[1]), "w2"]
    assert data["model"] == [str(out) for out in outs] and [m["spec"]["bits"] for m in data["method"]] == [4, 3, 2]
    for one, joint in zip(alone, together):
        assert {k: one[k] for k in ("perplexity", "kld", "top1_percent", "tokens")} == {k: joint[k] for k in ("perplexity", "kld", "top1_percent", "tokens")}
    assert len({r["perplexity"] for r in together}) == 3  # three different models, not one scored thrice

    code, _, err = run(capsys, "eval", str(outs[0]), str(outs[0]), *eval_args)
    assert code == 2 and "the same model twice" in err
    code, _, err = run(capsys, "eval", str(outs[0]), str(outs[2]), *eval_args, "--low-memory")
    assert code == 2 and "one model at a time" in err


def test_quantize_with_an_int8_head(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--group-size", "32", "--head-bits", "8", "--out", str(out))
    assert code == 0 and "quantised 15 linears" in stdout
    header = read_header(out)
    assert header["method"]["head"]["bits"] == 8 and header["layers"]["lm_head"]["spec"]["granularity"] == "channel"


def test_eval_of_a_float_model_has_no_reference(capsys, tiny_llama_dir, text_file):
    code, stdout, _ = run(capsys, "eval", str(tiny_llama_dir), "--text", str(text_file), "--windows", "1", "--ctx", "32")
    assert code == 0 and "reference" not in stdout


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--bits", "9"], "bits=9 is outside 2-8"),
        (["--bits", "1"], "bits=1 is outside 2-8"),
        (["--bits", "4", "--group-size", "0"], "group_size=0 is not a positive integer"),
        (["--bits", "4", "--group-size", "4096"], "group_size 4096 is larger than in_features 64"),
    ],
)
def test_impossible_settings_exit_with_one_line(capsys, tiny_llama_dir, tmp_path, argv, message):
    out = tmp_path / "q"
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), *argv, "--out", str(out))
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("lowbit: error:")]
    assert len(lines) == 1 and message in lines[0]
    assert "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_output_is_refused_before_work(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--bits", "4", "--out", str(out))
    assert code == 2 and "already exists" in err


def test_bad_files(capsys, tmp_path, text_file):
    fake = tmp_path / "m.gguf"
    fake.write_bytes(b"hello world")
    code, _, err = run(capsys, "eval", str(fake), "--text", str(text_file))
    assert code == 2 and "not a GGUF file" in err
    code, _, err = run(capsys, "info", str(tmp_path / "nothing"))
    assert code == 2 and "not found" in err


def test_short_text(capsys, tiny_llama_dir, tmp_path):
    short = tmp_path / "s.txt"
    short.write_text("a few words")
    code, _, err = run(capsys, "eval", str(tiny_llama_dir), "--text", str(short), "--ctx", "64")
    assert code == 2 and "fewer than one window" in err


def test_console_script_prints_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "lowbit.cli", "eval", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("lowbit: error:") and "Traceback" not in proc.stderr


def test_finetune_qlora_and_qat(capsys, tiny_llama_dir, tmp_path):
    text = tmp_path / "t.txt"
    from conftest import TEXT

    text.write_text(TEXT * 3)
    adapters = tmp_path / "adapters"
    code, stdout, _ = run(capsys, "finetune", "--model", str(tiny_llama_dir), "--method", "qlora", "--text", str(text), "--steps", "6",
                          "--batch", "2", "--ctx", "32", "--eval-windows", "2", "--rank", "2", "--group-size", "32", "--lr", "1e-2",
                          "--out", str(adapters), "--merge-out", str(tmp_path / "merged"), "--json", str(tmp_path / "r.json"))
    assert code == 0 and "after qlora" in stdout
    assert (adapters / "adapters.safetensors").is_file() and (tmp_path / "merged" / "config.json").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert len(report["losses"]) == 6 and report["before_perplexity"] > 0
    code, stdout, _ = run(capsys, "finetune", "--model", str(tiny_llama_dir), "--method", "qat", "--text", str(text), "--steps", "3",
                          "--batch", "2", "--ctx", "32", "--eval-windows", "2", "--bits", "4", "--group-size", "32", "--lsq",
                          "--out", str(tmp_path / "qat"))
    assert code == 0 and "after qat" in stdout
    code, stdout, _ = run(capsys, "info", str(tmp_path / "qat"))
    assert code == 0 and "method: qat" in stdout and "lsq: True" in stdout


def test_outliers_verb(capsys, tiny_llama_dir, text_file, tmp_path):
    code, stdout, _ = run(capsys, "outliers", str(tiny_llama_dir), "--calib-text", str(text_file), "--calib-samples", "2", "--calib-ctx", "32",
                          "--out", str(tmp_path / "o"))
    assert code == 0 and "attn_in" in stdout and "mlp_out" in stdout
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"max_magnitude_per_layer.png", "channel_layer_heatmap.png", "outliers.json"}


def test_w8a8_rejects_other_bit_widths(capsys, tiny_llama_dir, tmp_path):
    code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "smoothquant", "--bits", "4", "--out", str(tmp_path / "q"))
    assert code == 2 and "--bits does not apply to --method smoothquant" in err


def test_generate_and_roofline(capsys, tiny_llama_dir, tmp_path):
    code, stdout, err = run(capsys, "generate", str(tiny_llama_dir), "--prompt", "Quantisation is", "--max-new-tokens", "5", "--kv-bits", "4",
                            "--kv-group", "4", "--kv-residual", "2")
    assert code == 0 and stdout.startswith("Quantisation is") and "tokens/s (eager)" in err  # the compiled step takes the float cache only
    compiled = run(capsys, "generate", str(tiny_llama_dir), "--prompt", "Quantisation is", "--max-new-tokens", "5")
    eager = run(capsys, "generate", str(tiny_llama_dir), "--prompt", "Quantisation is", "--max-new-tokens", "5", "--eager")
    assert "tokens/s (compiled)" in compiled[2] and "tokens/s (eager)" in eager[2] and compiled[1] == eager[1]
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "generate", str(tiny_llama_dir), "--prompt", "x", "--device", "cuda")
        assert code == 2 and "no CUDA GPU" in err
    chart = tmp_path / "r.png"
    code, stdout, _ = run(capsys, "roofline", str(tiny_llama_dir), "--bandwidth", "20", "--flops", "0.2", "--ctx", "64", "--out", str(chart))
    assert code == 0 and "memory" in stdout and "W4" in stdout
    assert chart.read_bytes()[:4] == b"\x89PNG" and json.loads(chart.with_suffix(".json").read_text())["rows"]
    code, _, err = run(capsys, "roofline", str(tiny_llama_dir), "--bandwidth", "20")
    assert code == 2 and "give both --bandwidth and --flops, or neither" in err


def test_roofline_measure_interleaves_rounds(capsys, tmp_path, monkeypatch):
    from conftest import byte_tokenizer, tiny_llama
    from lowbit.analysis import roofline

    monkeypatch.setattr(roofline, "measure_machine", lambda: roofline.Machine(bandwidth_gbps=10.0, peak_gflops=100.0))  # 8 s saved
    model_dir = tmp_path / "llama128"  # rows of 128: every variant's groups fit
    tiny_llama(hidden=128, intermediate=256).save_pretrained(model_dir)
    byte_tokenizer().save_pretrained(model_dir)
    chart = tmp_path / "m.png"
    code, stdout, _ = run(capsys, "roofline", str(model_dir), "--measure", "--rounds", "2", "--new-tokens", "4", "--ctx", "8", "--out", str(chart))
    assert code == 0 and "W4A8 h8" in stdout
    rows = {r["variant"]: r for r in json.loads(chart.with_suffix(".json").read_text())["rows"]}
    assert rows["W4 ref"]["rounds"] == 1 and all(r["rounds"] == 2 for v, r in rows.items() if v != "W4 ref")
    assert all(r["decode_tokens_per_second"] > 0 and r["prefill_seconds"] > 0 for r in rows.values())
    code, _, err = run(capsys, "roofline", str(model_dir), "--measure", "--rounds", "0")
    assert code == 2 and "argument --rounds: 0 is not a positive integer" in err


def test_methods_table_in_the_docs_is_the_registrys():
    from pathlib import Path

    from lowbit.methods import methods_table

    page = (Path(__file__).parent.parent / "docs" / "methods.md").read_text()
    start = page.index("<!-- methods table")
    table = page[page.index("\n", start) + 1 : page.index("<!-- end of methods table -->")].strip()
    assert table == methods_table(markdown=True), "docs/methods.md is stale: paste `lowbit methods --markdown` into it"


def test_argument_parsing_imports_neither_torch_nor_transformers():
    code = ("import sys\nfrom lowbit.cli import build_parser\nbuild_parser()[0].parse_args(['quantize', '--method', 'gptq', '--out', 'x'])\n"
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]


def test_methods_command_lists_every_registered_method(capsys):
    from lowbit.methods import METHODS

    code, stdout, _ = run(capsys, "methods")
    assert code == 0 and [line.split()[0] for line in stdout.splitlines()[1:]] == list(METHODS)


def test_a_new_method_is_one_config_and_one_registration(capsys, tiny_llama_dir, tmp_path):
    """Register a throw-away method the way docs/methods.md says: it gets its flags, help,
    validation and header, quantises and round-trips, with nothing else touched."""
    from dataclasses import dataclass

    from lowbit import load_quantized
    from lowbit.errors import SpecError
    from lowbit.methods import METHODS, QuantizeConfig, register
    from lowbit.numerics.spec import QuantSpec
    from lowbit.settings import label, setting

    @register
    @dataclass(frozen=True, kw_only=True)
    class ShrunkRTN(QuantizeConfig):
        """RTN of the weight scaled by ``shrink`` (a toy: it only checks the plumbing)."""

        name = "shrunk-rtn"
        kind = "weight-only"
        summary = "round-to-nearest of a shrunk weight (test only)"
        spec_fields = frozenset({"bits", "group_size"})

        spec: QuantSpec = setting(QuantSpec(bits=4, group_size=32), "the weight format")
        shrink: float = setting(1.0, "factor applied to the weight before rounding")

        def __post_init__(self):
            super().__post_init__()
            if not 0 < self.shrink <= 1:
                raise SpecError(f"{label(ShrunkRTN, 'shrink')} must lie in (0, 1], got {self.shrink!r}")

        def quantize_weight(self, weight, name):
            from lowbit.algorithms.rtn import rtn_quantize

            return rtn_quantize(weight * self.shrink, self.spec, name)

    try:
        with pytest.raises(SystemExit):
            main(["quantize", "--help"])
        help_text = capsys.readouterr().out
        assert "shrunk-rtn" in help_text and "--shrink" in help_text and "options of shrunk-rtn" in help_text
        out = tmp_path / "q"
        code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "shrunk-rtn", "--shrink", "0.5", "--bits", "3", "--out", str(out))
        assert code == 0 and "shrunk-rtn" in stdout
        header = load_quantized(out).header
        assert header["method"] == {**ShrunkRTN(spec=QuantSpec(bits=3, group_size=32), shrink=0.5).to_dict()}
        code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "shrunk-rtn", "--shrink", "2", "--out", str(tmp_path / "r"))
        assert code == 2 and "shrink (--shrink) must lie in (0, 1]" in err
        code, _, err = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "shrunk-rtn", "--asym", "--out", str(tmp_path / "r"))
        assert code == 2 and "shrunk-rtn cannot take symmetric=False (--asym)" in err
    finally:
        del METHODS["shrunk-rtn"]


def test_roofline_works_bare_by_measuring_this_machine(capsys, tiny_llama_dir, monkeypatch):
    from lowbit.analysis import roofline

    calls = []
    monkeypatch.setattr(roofline, "measure_machine", lambda: calls.append(1) or roofline.Machine(bandwidth_gbps=12.0, peak_gflops=150.0))
    code, stdout, _ = run(capsys, "roofline", str(tiny_llama_dir))
    assert code == 0 and calls == [1]
    assert "machine (measured on this machine): 12.0 GB/s, 150 GFLOP/s" in stdout and "W4" in stdout


def test_generate_one_token_reports_no_decode_rate(capsys, tiny_llama_dir):
    code, stdout, err = run(capsys, "generate", str(tiny_llama_dir), "--prompt", "Quantisation is", "--max-new-tokens", "1")
    assert code == 0 and "nan" not in err and "no decode step timed" in err and "1 new tokens" in err


def test_quantize_eval_prints_generated_text_from_both_models(capsys, tiny_llama_dir, text_file, tmp_path):
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--group-size", "32", "--asym", "--out", str(tmp_path / "q"),
                          "--eval", "--text", str(text_file), "--windows", "2", "--ctx", "64", "--prompt", "Groups of weights")
    assert code == 0
    table, samples = stdout.split("greedy continuation of 'Groups of weights'")
    lines = [line for line in samples.splitlines() if line.strip()]
    assert len(lines) == 3 and "(reference)" in lines[1] and lines[2].split()[0] == "q"
    assert all("Groups of weights" in line for line in lines[1:])


def test_info_describes_the_method_in_words(capsys, tiny_llama_dir, text_file, tmp_path):
    out = tmp_path / "g"
    code, _, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--group-size", "32", "--calib-text", str(text_file),
                     "--calib-samples", "4", "--calib-ctx", "32", "--out", str(out))
    assert code == 0
    code, stdout, _ = run(capsys, "info", str(out))
    assert code == 0 and "{" not in stdout.split("\n\n")[0]  # no raw JSON in the header part
    assert "method: gptq (config version 1)" in stdout and "  act_order: static" in stdout and "  spec: W4 g32 sym" in stdout
    assert "calibration: corpus=None, text_file=" in stdout and "samples=4" in stdout


def test_readme_commands_and_api_snippet_use_what_exists():
    """README's main command parses as written, and its API snippet imports only names that
    exist and that it uses."""
    import ast
    import re
    import shlex
    from pathlib import Path

    from lowbit.cli import build_parser

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    main_command = next(line for line in readme.splitlines() if line.startswith("scripts/install.sh && .venv/bin/lowbit quantize"))
    argv = shlex.split(main_command.split(".venv/bin/lowbit ", 1)[1])
    args = build_parser()[0].parse_args(argv)
    assert args.method == "gptq" and args.eval
    snippet = re.search(r"```python\n(.*?)```", readme.split("## Python API", 1)[1], re.S).group(1)
    tree = ast.parse(snippet)
    imported = [(node.module, alias.name) for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names]
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    for module, name in imported:
        assert hasattr(importlib.import_module(module), name), (module, name)
        assert name in used, f"README's snippet imports {name} and never uses it"
    assert {"CalibrationConfig", "GPTQConfig"} <= {name for _, name in imported}


def test_quantize_calibrates_on_the_corpus_mix_and_records_it(capsys, tiny_llama_dir, tmp_path, monkeypatch):
    from conftest import TEXT

    from lowbit.data.texts import CORPORA

    monkeypatch.setitem(CORPORA, "pydoc", lambda: TEXT)
    monkeypatch.setitem(CORPORA, "shakespeare", lambda: "To be, or not to be, that is the question. " * 60)
    out = tmp_path / "q"
    code, stdout, _ = run(capsys, "quantize", "--model", str(tiny_llama_dir), "--method", "gptq", "--group-size", "32", "--calib-corpus", "mix",
                          "--calib-samples", "4", "--calib-ctx", "64", "--out", str(out))
    assert code == 0 and read_header(out)["calibration"]["corpus"] == "mix"
