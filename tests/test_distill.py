"""Distillation: the student is made from the teacher's own tensors, training against the
teacher lowers its KLD, a killed run resumes to the same student, a changed command refuses
to resume, and the student quantises like any model."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_llama, tiny_model
from lowbit.cli import main
from lowbit.errors import LowbitError, SpecError
from lowbit.models.architectures import architecture_for
from lowbit.training.config import DistillConfig, TrainConfig
from lowbit.training.distill import distill, make_student, partial_dir, student_blocks


def test_student_blocks_are_evenly_spaced_with_both_ends():
    assert student_blocks(30, 15) == [0, 2, 4, 6, 8, 10, 12, 14, 17, 19, 21, 23, 25, 27, 29]
    assert student_blocks(18, 9)[0] == 0 and student_blocks(18, 9)[-1] == 17
    assert student_blocks(4, 2) == [0, 3]
    with pytest.raises(LowbitError, match="keep between 1 and 3"):
        student_blocks(4, 4)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_the_student_holds_the_teachers_tensors_for_the_kept_blocks(family):
    teacher = tiny_model(family, layers=4)
    arch = architecture_for(teacher.config.model_type)
    student = make_student(teacher, arch, [0, 3])
    assert student.config.num_hidden_layers == 2
    if family == "gemma3":
        assert student.config.layer_types == [teacher.config.layer_types[0], teacher.config.layer_types[3]]
    for new, old in ((0, 0), (1, 3)):
        for name, tensor in teacher.model.layers[old].state_dict().items():
            assert torch.equal(student.model.layers[new].state_dict()[name], tensor), name
    assert torch.equal(student.get_input_embeddings().weight, teacher.get_input_embeddings().weight)
    with torch.no_grad():
        assert student(torch.randint(0, 256, (1, 12))).logits.shape == (1, 12, 257)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A tiny Llama trained for a while on the test text: a random one predicts nearly
    uniformly, whatever its depth, and would leave a student nothing to learn from it."""
    from conftest import TEXT, byte_tokenizer
    from lowbit.training.trainer import train

    path = tmp_path_factory.mktemp("teacher")
    model, tokenizer = tiny_llama(layers=4), byte_tokenizer()
    tokens = torch.tensor(tokenizer(TEXT[: len(TEXT) // 2]).input_ids)
    train(model, tokens, TrainConfig(steps=80, lr=3e-3, batch_size=8, ctx=64, warmup=0.0), progress=False)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def quick(steps=30, save_every=0, kd_weight=0.5):
    return DistillConfig(student_layers=2, kd_weight=kd_weight, save_every=save_every,
                         train=TrainConfig(steps=steps, lr=1e-3, batch_size=4, ctx=64, warmup=0.0))


def test_distillation_lowers_the_students_kld(teacher_dir, text_file, tmp_path):
    report = distill(str(teacher_dir), tmp_path / "student", quick(), text_file=str(text_file), eval_n=4, progress=False)
    made, trained = report.scores["student (made)"], report.scores["student (trained)"]
    assert trained["kld"] < 0.7 * made["kld"], report.scores
    assert report.scores["teacher"]["kld"] == pytest.approx(0.0, abs=1e-6)
    assert (tmp_path / "student" / "distill.json").exists() and not partial_dir(tmp_path / "student").exists()


def test_pure_distillation_beats_the_next_token_loss_on_kld(teacher_dir, text_file, tmp_path):
    kd = distill(str(teacher_dir), tmp_path / "kd", quick(kd_weight=1.0), text_file=str(text_file), eval_n=4, progress=False)
    ce = distill(str(teacher_dir), tmp_path / "ce", quick(kd_weight=0.0), text_file=str(text_file), eval_n=4, progress=False)
    assert kd.scores["student (trained)"]["kld"] < ce.scores["student (trained)"]["kld"]


def distill_argv(teacher_dir, text_file, out, *extra):
    return ["distill", "--teacher", str(teacher_dir), "--text", str(text_file), "--student-layers", "2", "--steps", "60",
            "--save-every", "10", "--lr", "1e-3", "--ctx", "64", "--batch", "4", "--eval-windows", "2", "--out", str(out), *extra]


def test_a_killed_run_resumes_to_the_same_student_and_a_changed_one_refuses(teacher_dir, text_file, tmp_path, capsys):
    assert main(distill_argv(teacher_dir, text_file, tmp_path / "whole")) == 0
    out = tmp_path / "killed"
    state = partial_dir(out) / "state.pt"
    proc = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *distill_argv(teacher_dir, text_file, out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 300
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert state.exists() and not out.exists(), "the run finished before it could be killed"
    capsys.readouterr()
    assert main(distill_argv(teacher_dir, text_file, out, "--kd-weight", "0.9")) == 2
    assert "holds a run of other settings" in capsys.readouterr().err
    assert main(distill_argv(teacher_dir, text_file, out)) == 0
    assert "resumed at step" in capsys.readouterr().out
    whole, resumed = load_file(tmp_path / "whole" / "model.safetensors"), load_file(out / "model.safetensors")
    assert whole.keys() == resumed.keys()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert not partial_dir(out).exists()

    assert main(["quantize", "--model", str(out), "--method", "rtn", "--group-size", "32", "--out", str(tmp_path / "q")]) == 0


def test_bad_distill_settings_are_refused():
    with pytest.raises(SpecError, match="must lie in"):
        DistillConfig(kd_weight=1.5)
    with pytest.raises(SpecError, match="trains in one process"):
        DistillConfig(train=TrainConfig(processes=2))


def test_distill_refuses_a_student_as_deep_as_its_teacher_in_one_line(capsys, tiny_llama_dir, tmp_path):
    code = main(["distill", "--teacher", str(tiny_llama_dir), "--student-layers", "2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "keep between 1 and 1" in err[0], err
    assert not (tmp_path / "s").exists()
