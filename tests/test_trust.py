"""Runs users can trust (issue "Trust"): resume as documented, no silent bad model, one clear line
for every mistake, nothing lost on a fault. Each test meets the fault where the user does: the
command line's exit status, its one ``error:`` line, and what is left on disk."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tests.test_calibration import fit_args
from vq4dit import VQConfig, load_dit, save_quantized
from vq4dit.engine import build_student
from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO
from vq4dit.quantize import finalize_model_

# A long run: only CandidatePruning and an every-epoch checkpoint (no stop rule).
LONG = ["--trainer.callbacks=[{class_path: callbacks.CandidatePruning}, "
        "{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"]


def run_main(monkeypatch, capsys, args) -> tuple[int, str]:
    """``python train.py ARGS`` in this process: (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", ["train.py", *map(str, args)])
    code = 0
    try:
        train.main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    return code, capsys.readouterr().err


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def earlier_export(folder: Path) -> dict[str, bytes]:
    """A packed model at ``folder`` (as an earlier run left it) and its files' bytes."""
    torch.manual_seed(0)
    student = build_student(load_dit("tiny"), VQConfig(codebook_size=16, subvector_dim=2), progress=False)
    finalize_model_(student)
    save_quantized(student, folder)
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_diverging_run_stops_with_one_line_and_keeps_the_earlier_export(tmp_path, monkeypatch, capsys):
    before = earlier_export(tmp_path / "packed")
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.calibration.lr_logits=1e30", "--model.calibration.lr_codebook=1e30",
                                                       "--trainer.max_epochs=3"))
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "diverged at step" in line and "transformer_blocks." in line, line  # names step and layer
    assert {p.name: p.read_bytes() for p in (tmp_path / "packed").iterdir()} == before  # untouched


def test_nan_teacher_is_refused_before_any_work(tmp_path, monkeypatch, capsys):
    model = load_dit("tiny")
    with torch.no_grad():
        model.transformer_blocks[0].ff.net[2].weight[0, :3] = float("nan")
    model.save_pretrained(tmp_path / "nan_dit")
    start = time.perf_counter()
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.model", tmp_path / "nan_dit", model=[
        "--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_classes=1000"]))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert "NaN" in line and "ff.net.2.weight" in line, line
    assert time.perf_counter() - start < 30
    assert not (tmp_path / "packed").exists()


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.vq.subvector_dim=3", "does not divide"),
        ("--model.layers.include=[nothing.matches]", "no nn.Linear layer matched"),
        ("--model.evaluation.quantized={tmp}/earlier", "model.quantized is for test"),
        ("--model.export.dir={tmp}/unrelated", "not a vq4dit packed model"),
        ("--data.cache_dir={tmp}/a_file/cache", "cache_dir"),
        ("--trainer.callbacks=[{{class_path: callbacks.CalibrationStop, init_args: {{patience: 0}}}}]",
         "CalibrationStop.patience=0 is out of range: allowed [1, inf)"),
        ("--calibration_report.every_n_steps=-5", "CalibrationReport.every_n_steps=-5 is out of range: allowed [0, inf)"),
    ],
)
def test_mistakes_knowable_at_start_fail_at_start(tmp_path, monkeypatch, capsys, override, message):
    earlier_export(tmp_path / "earlier")
    (tmp_path / "unrelated").mkdir()
    (tmp_path / "unrelated" / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("not a folder")
    code, err = run_main(monkeypatch, capsys, [*fit_args(tmp_path), override.format(tmp=tmp_path)])
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert message in line, line
    assert (tmp_path / "unrelated" / "notes.txt").read_text() == "mine"


def test_help_lists_enum_choices(capsys):
    with pytest.raises(SystemExit):
        train.cli_main(["fit", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model.calibration.block_inputs {student,teacher}", "--model.calibration.optimizer {rmsprop,adam}",
                 "--model.calibration.regularizer {official,paper}", "--model.recipe {quality,paper}",
                 "--model.evaluation.model {quantized,fp}"):
        assert flag in out, flag
    # optional choices (None: the family's own sampler) show their type with the choices
    sampler = out[out.index("\n  --data.sampler SAMPLER") + 3:].split("\n  --", 1)[0]
    assert "Literal['ddpm', 'ddim']" in " ".join(sampler.split()), sampler


def test_ckpt_path_last_resumes_the_latest_checkpoint_of_the_run(tmp_path, monkeypatch, capsys):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run_main(monkeypatch, capsys, fit_args(straight, "--trainer.max_epochs=4"))[0] == 0
    assert run_main(monkeypatch, capsys, fit_args(resumed, "--trainer.max_epochs=2"))[0] == 0
    code, err = run_main(monkeypatch, capsys, fit_args(resumed, "--trainer.max_epochs=4", "--ckpt_path=last"))
    assert code == 0 and "resuming from" in err and "last.ckpt" in err
    a, b = (load_file(str(folder / "packed" / "diffusion_pytorch_model.safetensors")) for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical to the uninterrupted run
    assert sorted(p.name for p in (resumed / "tensorboard").iterdir()) == ["version_0"]  # logs on in the same folder


def test_ckpt_path_last_without_a_checkpoint_says_it_starts_anew(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1", "--ckpt_path=last"))
    assert code == 0 and "no checkpoint under" in err and "starting a new calibration" in err


@pytest.mark.parametrize("override", ["--data.num_steps=4", "--data.seed=1", "--model.calibration.lr_logits=0.01"])
def test_resume_with_other_settings_is_refused(tmp_path, monkeypatch, capsys, override):
    assert run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1"))[0] == 0
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last", override))
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    name = override[2:].split("=")[0].replace("model.", "")
    assert "another configuration" in line and name in line, line


def test_sigterm_saves_a_resumable_checkpoint_and_exits_nonzero(tmp_path):
    args = [sys.executable, "train.py", *fit_args(tmp_path, "--trainer.max_epochs=100000", *LONG)]
    process = subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 240
    while not list(tmp_path.rglob("epoch=*.ckpt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    (line,) = error_lines(err)
    assert "SIGTERM" in line and "--ckpt_path last" in line, line
    last = Path(line.split("resumable checkpoint ")[1].split(";")[0])
    saved = AtomicCheckpointIO().load_checkpoint(last)
    assert saved["global_step"] > 0 and "vq4dit" in saved and saved["optimizer_states"]
    assert not (tmp_path / "packed").exists()  # no export from an interrupted run


def test_disk_full_while_exporting_is_one_line_and_keeps_the_earlier_export(tmp_path, monkeypatch, capsys):
    before = earlier_export(tmp_path / "packed")
    import vq4dit.atomic as atomic

    real_fsync = os.fsync

    def full(fd):
        if os.fstat(fd).st_size > 100_000:  # the new diffusion_pytorch_model.safetensors
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", full)
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1", "--trainer.enable_checkpointing=false",
                                                       "--trainer.callbacks=[]"))
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "No space left on device" in line, line
    assert {p.name: p.read_bytes() for p in (tmp_path / "packed").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    assert run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1"))[0] == 0
    (last,) = tmp_path.rglob("last.ckpt")
    before = last.read_bytes()
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("vq4dit.lightning.checkpoint_io.torch.save", full)
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last"))
    assert code == 2 and "Traceback" not in err
    (line,) = error_lines(err)
    assert "No space left on device" in line and "ckpt" in line, line
    assert last.read_bytes() == before  # whole, not truncated
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".")]


def test_failed_start_leaves_no_empty_log_folder(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--data.num_classes=5000"))  # fails in setup
    assert code == 2 and "num_classes" in error_lines(err)[0]
    assert not list(tmp_path.rglob("version_*"))


def test_checkpoints_never_unpickle_code(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"vq4dit": {}, "payload": Path("not/a/plain/type")}, path)
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        AtomicCheckpointIO().load_checkpoint(path)
