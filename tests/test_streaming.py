"""Streamed quantisation (models larger than memory): the same checkpoint as in memory,
resumable after SIGKILL byte for byte, refusals, and the estimate against a measured peak."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TEXT, byte_tokenizer, tiny_llama, tiny_model
from lowbit import (AWQConfig, CalibrationConfig, GPTQConfig, QuantSpec, RTNConfig, SignRoundConfig, W8A8Config, load_model,
                    open_streamed, quantize_model, quantize_streamed, save_quantized)
from lowbit.checkpoint import checkpoint_files, load_quantized, read_header
from lowbit.errors import LowbitError
from lowbit.streaming import partial_directory

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = CalibrationConfig(samples=4, ctx=32, batch_size=2)


def _write(model, directory: Path) -> Path:
    model.save_pretrained(directory)
    byte_tokenizer().save_pretrained(directory)
    return directory


def _same_checkpoint(a: Path, b: Path) -> None:
    """Two checkpoints that hold the same model: equal tensors, equal headers."""
    first, second = load_quantized(a), load_quantized(b)
    sa, sb = first.model.state_dict(), second.model.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name
    assert read_header(a) == read_header(b)


METHODS = {
    "rtn": lambda: RTNConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False)),
    "gptq": lambda: GPTQConfig(spec=QuantSpec(bits=4, group_size=32, symmetric=False)),
    "awq": lambda: AWQConfig(spec=QuantSpec(bits=3, group_size=32)),
    "w8a8": lambda: W8A8Config(),
    "signround": lambda: SignRoundConfig(spec=QuantSpec(bits=4, group_size=32), iters=3),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_streamed_checkpoint_equals_the_in_memory_one(tmp_path, method):
    source = _write(tiny_llama(seed=1, layers=3), tmp_path / "src")
    config = METHODS[method]()
    calibration = CALIBRATION if config.calibrated else None
    loaded = load_model(str(source))
    if calibration is not None:
        calibration = CalibrationConfig(samples=4, ctx=32, batch_size=2, text_file=str(_text(tmp_path)))
    quantize_model(loaded, config, calibration, progress=False)
    save_quantized(loaded, tmp_path / "memory")
    streamed = open_streamed(str(source))
    result = quantize_streamed(streamed, config, tmp_path / "streamed", calibration, progress=False)
    assert len(checkpoint_files(tmp_path / "streamed")) == 3 + 2  # three blocks, the embeddings, the final norm (head tied)
    assert len(result.layers) == 3 * 7
    _same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert all(p.device.type == "meta" for p in streamed.model.parameters())  # nothing left in memory
    assert not partial_directory(tmp_path / "streamed").exists()


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_streamed_families_and_an_int8_head(tmp_path, family):
    source = _write(tiny_model(family, seed=2), tmp_path / "src")
    config = GPTQConfig(spec=QuantSpec(bits=4, group_size=32), head=QuantSpec(bits=8, granularity="channel", group_size=None))
    calibration = CalibrationConfig(samples=4, ctx=32, batch_size=2, text_file=str(_text(tmp_path)))
    loaded = load_model(str(source))
    quantize_model(loaded, config, calibration, progress=False)
    save_quantized(loaded, tmp_path / "memory")
    quantize_streamed(open_streamed(str(source)), config, tmp_path / "streamed", calibration, progress=False)
    _same_checkpoint(tmp_path / "memory", tmp_path / "streamed")
    assert "lm_head" in read_header(tmp_path / "streamed")["layers"]
    tokens = torch.tensor([[1, 5, 9, 3, 7]])
    torch.testing.assert_close(load_quantized(tmp_path / "streamed").model(tokens).logits, loaded.model(tokens).logits, rtol=0, atol=0)


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "calibration.txt"
    if not path.exists():
        path.write_text(TEXT * 4)
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "lowbit.cli", *args]


def test_a_killed_run_continues_to_a_byte_identical_checkpoint(tmp_path):
    source = _write(tiny_llama(seed=3, hidden=128, intermediate=320, layers=10), tmp_path / "src")
    text = _text(tmp_path)
    flags = ["quantize", "--model", str(source), "--method", "gptq", "--bits", "4", "--group-size", "32", "--asym", "--calib-text", str(text),
             "--calib-samples", "8", "--calib-ctx", "64", "--calib-batch", "2", "--low-memory"]
    subprocess.run(_cli(*flags, "--out", str(tmp_path / "whole")), check=True, capture_output=True, cwd=ROOT)
    out = tmp_path / "killed"
    partial = partial_directory(out)
    for kills, after in enumerate((2, 6), start=1):  # SIGKILL once shard 2 is on disk, then again after shard 6
        proc = subprocess.Popen(_cli(*flags, "--out", str(out)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        deadline = time.monotonic() + 300
        while len(list(partial.glob("checkpoint/lowbit-*.safetensors"))) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed; give the test model more blocks"
        assert not out.exists() and partial.is_dir()
    done = subprocess.run(_cli(*flags, "--out", str(out)), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continued an unfinished run" in done.stderr
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*"))
    assert files == sorted(p.relative_to(out) for p in out.rglob("*"))
    for name in files:
        assert (tmp_path / "whole" / name).read_bytes() == (out / name).read_bytes(), name
    assert not partial.exists()


def test_a_changed_command_refuses_the_unfinished_run(tmp_path):
    source = _write(tiny_llama(seed=4, layers=2), tmp_path / "src")
    text = _text(tmp_path)
    flags = ["quantize", "--model", str(source), "--method", "gptq", "--calib-text", str(text), "--calib-samples", "4", "--calib-ctx", "32",
             "--low-memory", "--out", str(tmp_path / "q")]
    partial = partial_directory(tmp_path / "q")
    partial.mkdir()
    (partial / "run.json").write_text(json.dumps({"method": {"name": "gptq"}}))
    done = subprocess.run(_cli(*flags, "--bits", "3", "--group-size", "32"), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    error = done.stderr.strip().splitlines()[-1]
    assert "unfinished run of a different command" in error and "calibration" in error and "Traceback" not in done.stderr
    assert not (tmp_path / "q").exists()


def test_budget_does_not_stream(tmp_path):
    source = _write(tiny_llama(seed=5, layers=2), tmp_path / "src")
    config = GPTQConfig(spec=QuantSpec(bits=4, group_size=32), budget=4.25)
    with pytest.raises(LowbitError, match="does not stream"):
        quantize_streamed(open_streamed(str(source)), config, tmp_path / "q", CALIBRATION, progress=False)
    with pytest.raises(LowbitError, match="quantize_streamed"):
        quantize_model(open_streamed(str(source)), RTNConfig())


def test_the_memory_cap_refuses_before_any_work(tmp_path):
    source = _write(tiny_llama(seed=6, layers=2), tmp_path / "src")
    done = subprocess.run(_cli("quantize", "--model", str(source), "--method", "rtn", "--group-size", "32", "--low-memory", "--max-memory", "50MB",
                               "--out", str(tmp_path / "q")), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2
    assert "more than the 50 MB --max-memory allows" in done.stderr
    assert not (tmp_path / "q").exists() and not partial_directory(tmp_path / "q").exists()
    bad = subprocess.run(_cli("quantize", "--model", str(source), "--max-memory", "lots", "--out", str(tmp_path / "q")),
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "is not a memory size" in bad.stderr
