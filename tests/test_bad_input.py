"""Bad input, as a hostile but realistic user gives it: every case exits with status 2 and
one line on stderr that names the problem, before any slow work, and leaves nothing behind."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import byte_tokenizer, tiny_llama
from lowbit.cli import main
from lowbit.errors import LowbitError
from lowbit.models.refs import CHECKPOINT_FILE

PROC = "/proc/lowbit-cannot-write-here"


def one_line_error(capsys, argv, message, watch=None):
    """Run the CLI; assert exit 2, a single stderr line naming ``message``, and that the
    directory ``watch`` gained nothing."""
    before = sorted(p.name for p in watch.iterdir()) if watch is not None else None
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("lowbit: error:"), err
    assert message in lines[0], lines[0]
    if watch is not None:
        assert sorted(p.name for p in watch.iterdir()) == before, "something was left behind"
    return lines[0]


@pytest.fixture
def quantised_dir(tiny_llama_dir, tmp_path_factory, capsys):
    out = tmp_path_factory.mktemp("q") / "q"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    return out


@pytest.fixture
def never_loads(monkeypatch):
    """Fail the test if any command gets as far as loading weights."""
    import lowbit.loader

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was refused")

    monkeypatch.setattr(lowbit.loader, "load_model", refuse)


# -- crashes that used to be tracebacks


@pytest.mark.parametrize("method, why", [("gptq", "GPTQ fixes each group's scale during its column sweep"),
                                         ("awq", "double-quantised scales cannot be rescaled exactly")])
def test_gptq_and_awq_refuse_double_quantisation_before_any_work(capsys, tiny_llama_dir, tmp_path, never_loads, method, why):
    line = one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--method", method, "--bits", "4", "--double-quant", "--out",
                                   tmp_path / "q"], f"{method} cannot take double_quant=True (--double-quant)", tmp_path)
    assert why in line


@pytest.mark.parametrize("method", ["rtn", "nf4"])
def test_double_quantisation_is_honoured_by_the_methods_that_fix_scales_first(capsys, tiny_llama_dir, tmp_path, method):
    """The other way it can go: the round-to-nearest methods double-quantise through the
    shared finishing step (codes computed against the 8-bit scales that are stored), and
    the checkpoint stores 8-bit scales, saves, reloads and runs."""
    from lowbit import load_quantized

    out = tmp_path / "q"
    argv = ["quantize", "--model", tiny_llama_dir, "--method", method, "--group-size", "32", "--double-quant", "--out", out]
    assert main([str(a) for a in argv]) == 0
    capsys.readouterr()
    loaded = load_quantized(out)
    layer = loaded.model.model.layers[0].mlp.down_proj
    assert layer.spec.double_quant and layer.scales_q.dtype == torch.uint8 and layer.scales is None
    with torch.no_grad():
        logits = loaded.model(torch.randint(0, 256, (1, 12))).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("quantised", [False, True])
def test_generate_refuses_an_empty_prompt(capsys, tiny_llama_dir, quantised_dir, quantised, never_loads):
    model = quantised_dir if quantised else tiny_llama_dir
    one_line_error(capsys, ["generate", model, "--prompt", ""], "--prompt is empty")


def test_skip_that_is_not_a_regex(capsys, tiny_llama_dir, tmp_path):
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--skip", "[", "--out", tmp_path / "q"],
                   "skip (--skip): '[' is not a regular expression", tmp_path)


def test_pickled_pytorch_weights_are_refused_with_one_line(capsys, tmp_path):
    model_dir = tmp_path / "pickled"
    model = tiny_llama()
    model_dir.mkdir()
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    byte_tokenizer().save_pretrained(model_dir)
    assert (model_dir / "pytorch_model.bin").is_file() and not list(model_dir.glob("*.safetensors"))
    one_line_error(capsys, ["eval", model_dir, "--ctx", "64"], "holds PyTorch pickle weights (pytorch_model.bin)")


def _as_from_a_terminal():
    """Ctrl-C's default action in the child, as a shell in a terminal gives it: a suite run
    as a background job (`pytest &`) hands its children SIGINT ignored, and Python then
    keeps ignoring it until lowbit's own handler is installed."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("delay", [0.3, 0.8, 1.5])  # in the imports (torch's take ~1 s), then loading
def test_ctrl_c_in_the_first_seconds_says_interrupted(tiny_llama_dir, tmp_path, delay):
    out = tmp_path / "q"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(tiny_llama_dir), "--method", "gptq",
                             "--calib-text", __file__, "--out", str(out)], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=_as_from_a_terminal)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "lowbit: interrupted" and "Traceback" not in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


# -- output locations are checked before any work


@pytest.mark.parametrize("where", ["proc", "under_a_file"])
def test_quantize_out_that_cannot_be_written(capsys, tiny_llama_dir, tmp_path, where, never_loads):
    (tmp_path / "afile").write_text("x")
    out = PROC if where == "proc" else tmp_path / "afile" / "sub"
    message = "cannot write in /proc" if where == "proc" else "is a file, not a directory"
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--out", out], message, tmp_path)


def test_eval_json_that_cannot_be_written(capsys, tiny_llama_dir, tmp_path, never_loads):
    one_line_error(capsys, ["eval", tiny_llama_dir, "--ctx", "64", "--json", f"{PROC}/r.json"], "--json /proc")


def test_eval_json_naming_a_directory_leaves_no_temporary_behind(capsys, tiny_llama_dir, tmp_path, never_loads):
    target = tmp_path / "results"
    target.mkdir()
    one_line_error(capsys, ["eval", tiny_llama_dir, "--ctx", "64", "--json", target], "is a directory; give a file name", tmp_path)
    assert list(target.iterdir()) == []


def test_finetune_json_is_checked_before_training_and_before_out_is_written(capsys, tiny_llama_dir, text_file, tmp_path, never_loads):
    one_line_error(capsys, ["finetune", "--model", tiny_llama_dir, "--method", "qat", "--text", text_file, "--ctx", "32", "--out",
                            tmp_path / "qat", "--json", PROC], "--json /proc", tmp_path)


@pytest.mark.parametrize("where", ["proc", "a_file"])
def test_outliers_out_that_cannot_be_written(capsys, tiny_llama_dir, tmp_path, where, never_loads):
    (tmp_path / "afile").write_text("x")
    out = PROC if where == "proc" else tmp_path / "afile"
    one_line_error(capsys, ["outliers", tiny_llama_dir, "--calib-ctx", "32", "--out", out], "--out", tmp_path)


def test_roofline_out_that_cannot_be_written(capsys, tiny_llama_dir, tmp_path):
    one_line_error(capsys, ["roofline", tiny_llama_dir, "--bandwidth", "10", "--flops", "1", "--out", f"{PROC}/r.png"], "--out /proc")


def test_bench_decode_checks_its_arguments_and_out_dir_first(capsys, tmp_path):
    one_line_error(capsys, ["bench-decode", "--models", "llama-1b", "--new-tokens", "0"], "argument --new-tokens: 0 is not a positive integer")
    one_line_error(capsys, ["bench-decode", "--models", "llama-1b", "--rounds", "0"], "argument --rounds: 0 is not a positive integer")
    one_line_error(capsys, ["bench-decode", "--models", "llama-1b", "--out-dir", PROC], "--out-dir /proc")
    one_line_error(capsys, ["bench-decode", "--models", "no-such-model"], "model 'no-such-model' not found")


# -- late validation: every argument is checked first


def test_quantize_eval_with_an_empty_text_fails_before_saving(capsys, tiny_llama_dir, tmp_path, never_loads):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--out", tmp_path / "q", "--eval", "--text", empty],
                   "is empty; give a file with text in it", tmp_path)


def test_quantize_eval_with_too_short_a_text_fails_before_saving(capsys, tiny_llama_dir, tmp_path, never_loads):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--group-size", "32", "--out", tmp_path / "q", "--eval", "--text", short,
                            "--ctx", "64"],
                   "fewer than one window", tmp_path)


def test_calibration_text_too_short_fails_before_the_weights_load(capsys, tiny_llama_dir, tmp_path, never_loads):
    short = tmp_path / "short.txt"
    short.write_text("only a few words here")
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--method", "gptq", "--group-size", "32", "--calib-text", short,
                            "--calib-ctx", "64", "--out", tmp_path / "q"], "fewer than one sample of 64; use a longer text or a smaller ctx (--calib-ctx)", tmp_path)


def test_group_size_larger_than_the_layers_fails_before_the_weights_load(capsys, tiny_llama_dir, tmp_path, never_loads):
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--group-size", "100000", "--out", tmp_path / "q"],
                   "group_size 100000 is larger than in_features 64", tmp_path)


def test_eval_flags_without_eval_are_refused(capsys, tiny_llama_dir, tmp_path):
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--windows", "4", "--out", tmp_path / "q"], "--windows apply with --eval", tmp_path)


# -- NaN / Inf in a quantised checkpoint


def _poison(checkpoint, key):
    file = checkpoint / CHECKPOINT_FILE
    from safetensors import safe_open

    with safe_open(file, framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, file, metadata=metadata)


@pytest.mark.parametrize("key", ["model.layers.0.self_attn.q_proj.scales", "model.norm.weight"])
def test_nan_in_a_checkpoint_is_found_on_load_and_named(capsys, quantised_dir, tmp_path, key):
    copy = tmp_path / "poisoned"
    shutil.copytree(quantised_dir, copy)
    _poison(copy, key)
    one_line_error(capsys, ["generate", copy, "--prompt", "hello", "--max-new-tokens", "2"], f"tensor {key} holds 1 NaN/Inf values")
    one_line_error(capsys, ["eval", copy, "--ctx", "64"], f"tensor {key} holds 1 NaN/Inf values")


# -- nonsense that used to be accepted silently


def test_nf4_takes_its_block_from_group_size_and_refuses_asym(capsys, tiny_llama_dir, tmp_path):
    from lowbit import read_header

    out = tmp_path / "nf4"
    assert main(["quantize", "--model", str(tiny_llama_dir), "--method", "nf4", "--group-size", "32", "--out", str(out)]) == 0
    capsys.readouterr()
    header = read_header(out)
    assert header["method"]["spec"]["group_size"] == 32
    assert {layer["group_size"] for layer in header["layers"].values()} == {32}
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, "--method", "nf4", "--asym", "--out", tmp_path / "nf4-asym"],
                   "nf4", tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--method", "llm-int8", "--threshold", "-1"], "threshold (--threshold) must be a positive number"),
    (["--method", "gptq", "--damp", "-1"], "damp (--damp) must lie in [0, 1)"),
    (["--method", "gptq", "--calib-samples", "0"], "samples (--calib-samples) must be an integer of at least 1"),
    (["--method", "smoothquant", "--alpha", "2"], "alpha (--alpha) must lie in [0, 1]"),
    (["--method", "smoothquant", "--alpha", "lots"], "argument --alpha: 'lots' is not a number in [0, 1] or 'search'"),
    (["--method", "rtn", "--calib-samples", "8"], "--calib-samples does not apply to --method rtn"),
    (["--method", "rtn", "--damp", "0.1"], "--damp does not apply to --method rtn (it is an option of gptq)"),
    (["--method", "w8a8", "--group-size", "32"], "--group-size does not apply to --method w8a8"),
    (["--bits", "3.5"], "argument --bits: '3.5' is not an integer from 2 to 8"),
    (["--head-bits", "3"], "argument --head-bits: invalid choice: 3"),
    (["--percentile", "99"], "percentile=99.0 applies to range 'percentile'"),
    (["--zero-point", "float"], "zero_point='float' applies to an asymmetric range"),
    (["--granularity", "channel", "--group-size", "32"], "group_size=32 only applies to granularity 'group'"),
])
def test_quantize_settings_that_cannot_apply(capsys, tiny_llama_dir, tmp_path, argv, message, never_loads):
    one_line_error(capsys, ["quantize", "--model", tiny_llama_dir, *argv, "--out", tmp_path / "q"], message, tmp_path)


@pytest.mark.parametrize("argv, message", [
    (["--bandwidth", "-5", "--flops", "1"], "argument --bandwidth: -5 is not a number above 0"),
    (["--bandwidth", "0", "--flops", "0"], "argument --bandwidth: 0 is not a number above 0"),
    (["--ctx", "0"], "argument --ctx: 0 is not a positive integer"),
    (["--kv-bits", "0"], "argument --kv-bits: 0 is not a number above 0"),
    (["--flops", "2"], "give both --bandwidth and --flops, or neither"),
])
def test_roofline_values_that_mean_nothing(capsys, tiny_llama_dir, argv, message):
    one_line_error(capsys, ["roofline", tiny_llama_dir, *argv], message)


def test_outliers_threshold_and_sample_length(capsys, tiny_llama_dir, text_file, never_loads):
    one_line_error(capsys, ["outliers", tiny_llama_dir, "--threshold", "-1"], "argument --threshold: -1 is not a number above 0")
    short = text_file.parent / "short.txt"
    short.write_text("a handful of words only")
    # the hint names this command's own flag
    one_line_error(capsys, ["outliers", tiny_llama_dir, "--calib-text", short, "--calib-ctx", "64"], "a smaller ctx (--calib-ctx)")


def test_eval_ctx_beyond_the_models_positions(capsys, tiny_llama_dir, never_loads):
    one_line_error(capsys, ["eval", tiny_llama_dir, "--ctx", "4096"], "--ctx 4096 is beyond")


# -- messages that said the wrong thing


def test_text_that_is_a_directory(capsys, tiny_llama_dir, tmp_path, never_loads):
    one_line_error(capsys, ["eval", tiny_llama_dir, "--ctx", "64", "--text", tmp_path], "is a directory; give a UTF-8 text file")


def test_unknown_gguf_architecture_is_one_line(capsys, tmp_path):
    import numpy as np
    from gguf import GGUFWriter

    path = tmp_path / "foreign.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    one_line_error(capsys, ["eval", path], "GGUF architecture 'gpt2' is not supported; lowbit reads GGUF files of")


def test_unknown_model_type_is_one_line(capsys, tiny_llama_dir, tmp_path):
    copy = tmp_path / "odd"
    shutil.copytree(tiny_llama_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model_type"] = "no-such-family"
    (copy / "config.json").write_text(json.dumps(config))
    one_line_error(capsys, ["eval", copy, "--ctx", "64"], "could not read")


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "x", "--kv-bits", "3"], "argument --kv-bits: invalid choice: 3 (choose from 2, 4, 8)"),
    (["generate", "--prompt", "x", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not a positive integer"),
    (["eval", "--windows", "0"], "argument --windows: 0 is not a positive integer"),
    (["quantize", "--method", "magic", "--out", "x"], "argument --method: invalid choice: 'magic'"),
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
])
def test_flag_values_outside_their_choices_are_one_line(capsys, argv, message):
    one_line_error(capsys, argv, message)


def test_info_on_a_directory_with_a_config_and_no_weights(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    one_line_error(capsys, ["info", tmp_path], "has a config.json but no *.safetensors weights")


# -- reproducible checkpoints


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_same_command_same_bytes(capsys, tiny_llama_dir, text_file, tmp_path, method):
    calib = ["--calib-text", str(text_file), "--calib-samples", "4", "--calib-ctx", "32"] if method == "gptq" else []
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run
        assert main(["quantize", "--model", str(tiny_llama_dir), "--method", method, "--group-size", "32", *calib, "--out", str(out)]) == 0
        digests.append({p.name: p.read_bytes() for p in sorted(out.iterdir())})
    capsys.readouterr()
    assert digests[0] == digests[1]


# -- the Python API


def test_api_misuse_gets_a_lowbit_error(tiny_llama_dir, tmp_path):
    from lowbit import QuantSpec, RTNConfig, evaluate, load_model, quantize_model, save_quantized

    loaded = load_model(str(tiny_llama_dir))
    windows = torch.randint(0, 256, (2, 16))
    with pytest.raises(LowbitError, match="at least one model"):
        evaluate({}, windows)
    with pytest.raises(LowbitError, match="at least one window"):
        evaluate({"m": loaded.model}, windows[:0])
    with pytest.raises(LowbitError, match="outside"):
        evaluate({"m": loaded.model}, windows + 1000)
    with pytest.raises(LowbitError, match="int64"):
        evaluate({"m": loaded.model}, windows.float())
    with pytest.raises(LowbitError, match="takes a method config, e.g. RTNConfig"):
        quantize_model(loaded, {"bits": 4})
    with pytest.raises(LowbitError, match="takes the LoadedModel"):
        quantize_model(loaded.model, RTNConfig())
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=32)), progress=False)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(LowbitError, match="is a file, not a directory"):
        save_quantized(loaded, a_file / "q")
    with pytest.raises(LowbitError, match="already exists"):
        save_quantized(loaded, a_file)


# -- the conversion cache


def test_conversion_cache_is_keyed_by_the_file_and_drops_stale_entries(tmp_path, monkeypatch):
    from lowbit.models import loading

    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF" + b"\0" * 64)
    first = loading.gguf_cache_path(source)
    first.mkdir(parents=True)
    (first / loading.SOURCE_RECORD).write_text(json.dumps({"gguf": str(source.resolve())}))
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed
    second = loading.gguf_cache_path(source)
    assert second != first
    second.mkdir()
    # a conversion of a file since deleted goes too; one of another file that still exists stays
    gone, kept = tmp_path / "gone.gguf", tmp_path / "kept.gguf"
    for other in (gone, kept):
        other.write_bytes(b"GGUF" + b"\0" * 64)
        loading.gguf_cache_path(other).mkdir()
        (loading.gguf_cache_path(other) / loading.SOURCE_RECORD).write_text(json.dumps({"gguf": str(other.resolve())}))
    orphan = loading.gguf_cache_path(gone)
    gone.unlink()
    loading._remove_stale_conversions(source, second)
    assert not first.exists() and second.exists()
    assert not orphan.exists() and loading.gguf_cache_path(kept).exists()
