"""Recorded window inputs (issue 22: ``calibration.window_inputs`` memory / disk): the teacher's input of
a window's first block recorded once per training batch, so windowed steps run the teacher from
there. The same losses and the same exported model as recomputing, the teacher's earlier blocks run
once per batch, a full disk falls back to recomputing with one warning line, resume records again."""

import copy
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_block_windows import TINY_VQ, step, windowed_fit
from tests.test_families import text_items, tiny_pixart
from tests.test_flux import flux_batch, tiny_flux
from tests.test_mmdit import sd3_batch, tiny_sd3
from tests.test_spread_blocks import packed_tensors
from tests.test_trust import error_lines, run_main
from tests.test_trust_disk import small_disk  # noqa: F401  (a fixture)
from vq4dit import load_dit
from vq4dit.engine import CalibrationConfig, Calibrator, block_losses
from vq4dit.engine.window_inputs import WindowInputs, batch_key, record_block_input
from vq4dit.families import conditioning_of, family_of
from vq4dit.models import block_modules
from vq4dit.trajectories import ShuffledBatches


def pixart_batch(count: int = 2, seed: int = 0):
    items = text_items(8, seed)
    return conditioning_of(items).batch(items, torch.arange(count))


CASES = {  # model, batch of B items, guidance, window starts to try
    "dit": (lambda: load_dit("tiny"), lambda: (torch.randn(2, 4, 8, 8), torch.tensor([10, 700]), torch.tensor([3, 5])),
            4.0, [1]),
    "pixart": (lambda: tiny_pixart(num_layers=3), pixart_batch, 4.0, [1, 2]),
    "sd3": (lambda: tiny_sd3(num_layers=3), sd3_batch, 4.0, [1, 2]),  # the last block has no context output
    "flux": (lambda: tiny_flux(double=2, single=2), flux_batch, 3.5, [1, 2, 3]),  # 2: the first single block
}


def fill(disk) -> None:
    """Write to ``disk`` until it is full (a real ENOSPC)."""
    handle = open(disk / "filler", "wb", buffering=0)
    try:
        while True:
            handle.write(bytes(4096))
    except OSError as err:
        assert err.errno == 28  # ENOSPC
    finally:
        handle.close()


def calls_per_block(model) -> tuple[list[int], list]:
    counts, handles = [0] * len(block_modules(model)), []
    for index, block in enumerate(block_modules(model)):
        handles.append(block.register_forward_pre_hook(lambda *_, i=index: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


@pytest.mark.parametrize("name", sorted(CASES))
def test_a_forward_from_recorded_inputs_gives_the_same_losses_without_the_earlier_blocks(name):
    make, batch_of, guidance, starts = CASES[name]
    teacher = make()
    engine = Calibrator.build(teacher, TINY_VQ, CalibrationConfig(block_inputs="teacher"), guidance_scale=guidance,
                              progress=False)
    family, batch = family_of(teacher), engine.model_batch(batch_of())
    blocks = len(block_modules(teacher))
    for start in starts:
        owned = range(start, min(start + 2, blocks))
        call = record_block_input(family, teacher, batch, start)
        expected = block_losses(teacher, engine.student, batch, block_inputs="teacher", owned_blocks=owned)[0]
        counts, handles = calls_per_block(teacher)
        try:
            got = block_losses(teacher, engine.student, batch, block_inputs="teacher", owned_blocks=owned,
                               start_inputs=(start, call))[0]
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(got, expected) and got[list(owned)].gt(0).all()
        assert counts[:start] == [0] * start and counts[start:owned.stop] == [1] * len(owned)  # earlier blocks skipped
        assert counts[owned.stop:] == [0] * (blocks - owned.stop)  # and it stops after the window
        # a recording of a later block from this one equals the one from the model's input
        if owned.stop < blocks:
            again = record_block_input(family, teacher, batch, owned.stop, start, call)
            direct = record_block_input(family, teacher, batch, owned.stop)
            flat = lambda c: [t for t in (*c[0], *c[1].values()) if torch.is_tensor(t)]  # noqa: E731
            assert all(torch.equal(a, b) for a, b in zip(flat(again), flat(direct), strict=True))
    assert len(block_modules(teacher)) == blocks  # the block lists are whole again


def test_fixed_batches_repeat_every_epoch_in_a_new_order_and_their_keys_tell_them_apart():
    items = {"x": torch.randn(10, 4, 8, 8), "t": torch.arange(10), "y": torch.arange(10) % 3}
    epoch = [0]
    fixed = ShuffledBatches(items, 3, seed=0, shuffle=True, epoch_fn=lambda: epoch[0], fixed=True)
    first = [batch_key(b) for b in fixed]
    epoch[0] = 1
    second = [batch_key(b) for b in fixed]
    assert sorted(first) == sorted(second) and first != second and len(set(first)) == 4
    loose = ShuffledBatches(items, 3, seed=0, shuffle=True, epoch_fn=lambda: epoch[0])
    assert not set(batch_key(b) for b in loose) & set(first)  # items regrouped every epoch


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_windowed_steps_on_recorded_inputs_calibrate_exactly_as_recomputing(tmp_path, mode):
    """Tiny Flux (2 double + 2 single blocks) in windows of 1: the same step losses and the same hard
    student as recomputing; the teacher's first block runs once per batch per recording, not per step."""
    teacher = tiny_flux(double=2, single=2)
    batches = [flux_batch(2, seed) for seed in range(3)]
    students = {}
    for store in ("recompute", mode):
        config = CalibrationConfig(block_inputs="teacher", window_blocks=1, window_inputs=store,
                                   window_inputs_dir=str(tmp_path / "inputs") if store == "disk" else None)
        if store == "disk":  # a killed run's recording, with a write it never finished
            stale = tmp_path / "inputs" / "block_007"
            (stale / ".abc.pt.tmp-host-1-x").mkdir(parents=True)
            (stale / "abc.pt").write_bytes(b"old")
        engine = Calibrator.build(copy.deepcopy(teacher), TINY_VQ, config, guidance_scale=3.5, progress=False)
        optimizer, losses, count = engine.make_optimizer(), [], 0
        counts, handles = calls_per_block(engine.teacher)
        while not engine.window.done:
            line = engine.record_window_inputs_(batches, len(batches))
            assert (line is None) == (store == "recompute" or engine.window.index == 0), line
            for index in range(6):
                losses.append(float(engine.step_loss(batches[index % 3], count).distillation))
                step(engine, optimizer, batches[index % 3], count)
                count += 1
            engine.advance_window_(optimizer, "cpu")
        for handle in handles:
            handle.remove()
        students[store] = (losses, {k: v.clone() for k, v in engine.student.state_dict().items()}, counts)
        if store != "recompute":
            assert engine.window_inputs.hits == 3 * 6 * 2  # windows 2-4: every step (twice: step_loss + step)
            engine.finish_windows_("cpu")
            assert engine.window_inputs.start == 0 and not list((tmp_path / "inputs").rglob("*.pt"))
            assert not (tmp_path / "inputs" / "block_007").exists()  # removed by the first recording
    (loss_a, state_a, counts_a), (loss_b, state_b, counts_b) = students["recompute"], students[mode]
    assert loss_a == loss_b and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert counts_a[0] == 4 * 6 * 2 and counts_b[0] == 6 * 2 + 3  # window 0's steps + one recording


def test_a_recording_that_does_not_fit_falls_back_to_recomputing(small_disk):  # noqa: F811
    teacher = tiny_flux(double=2, single=2)
    batches = [flux_batch(2, seed) for seed in range(3)]
    engine = Calibrator.build(teacher, TINY_VQ, CalibrationConfig(block_inputs="teacher", window_blocks=1), guidance_scale=3.5,
                              progress=False)
    engine.window_inputs = WindowInputs("disk", small_disk / "inputs")
    fill(small_disk)
    engine.window.index = 1
    line = engine.record_window_inputs_(batches, len(batches))
    assert "recording stopped" in line and "no space left on device" in line.lower(), line
    assert engine.recorded_inputs(batches[0]) is None and not list(small_disk.rglob("*.pt"))
    engine.window.index = 2
    assert "not recorded" in engine.record_window_inputs_(batches, len(batches))  # off for the rest of the run


def test_a_recording_larger_than_the_available_ram_falls_back_before_recording(monkeypatch):
    from vq4dit.engine import window_inputs

    teacher = tiny_flux(double=2, single=2)
    batches = [flux_batch(2, seed) for seed in range(3)]
    engine = Calibrator.build(teacher, TINY_VQ, CalibrationConfig(block_inputs="teacher", window_blocks=1,
                                                                  window_inputs="memory"), guidance_scale=3.5, progress=False)
    monkeypatch.setattr(window_inputs, "_available_ram", lambda: 4096)
    engine.window.index = 1
    line = engine.record_window_inputs_(batches, len(batches))
    assert "recording stopped" in line and "GiB more host RAM" in line and "window_inputs: disk" in line, line
    assert engine.window_inputs.entries == {} and engine.recorded_inputs(batches[0]) is None


def test_window_inputs_need_windows_and_say_so_before_any_work(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="window_inputs='memory' needs window_blocks"):
        CalibrationConfig(block_inputs="teacher", window_inputs="memory")
    with pytest.raises(ValueError, match="window_inputs must be one of"):
        CalibrationConfig(block_inputs="teacher", window_blocks=1, window_inputs="gpu")
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path, "--model.calibration.window_blocks=null",
                                                           "--model.offload_blocks=false",
                                                           "--model.calibration.window_inputs=disk"))
    assert code != 0 and len(error_lines(err)) == 1 and "needs window_blocks" in error_lines(err)[0], err
    assert "teacher trajectories" not in err
    (tmp_path / "a_file").write_text("x")  # a folder below a file: refused before the trajectories, not at window 2
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path, "--model.calibration.window_inputs=disk",
                                                           f"--model.calibration.window_inputs_dir={tmp_path / 'a_file' / 'in'}"))
    assert code != 0 and len(error_lines(err)) == 1 and "calibration.window_inputs_dir" in error_lines(err)[0], err
    assert "not writable" in error_lines(err)[0] and "teacher trajectories" not in err


def test_a_windowed_fit_on_recorded_inputs_exports_and_resumes_as_one_run(tmp_path, monkeypatch, capsys, caplog,
                                                                         recwarn, small_disk):  # noqa: F811
    """``train.py fit`` of the tiny DiT in windows of 1 with recorded inputs: memory and disk export
    the same model; a full disk warns once and exports it too; stopped in window 2 and resumed, it
    records again and exports it too; killed with SIGKILL once its recording is on disk, resumed
    from its last checkpoint, it exports it too and leaves no recording behind."""
    caplog.set_level(logging.INFO)
    runs = {"memory": ["--model.calibration.window_inputs=memory"],
            "disk": ["--model.calibration.window_inputs=disk"],
            "full": ["--model.calibration.window_inputs=disk", f"--model.calibration.window_inputs_dir={small_disk}"]}
    fill(small_disk)
    for name, extra in runs.items():
        caplog.clear()
        code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / name, "--trainer.max_epochs=6", *extra))
        assert code == 0 and not error_lines(err), err
        assert "window 1/2 (blocks 0-0) finished at step 24" in caplog.text and "report (48 steps)" in caplog.text
        recorded = "block 1's inputs of 16 batches recorded" in caplog.text
        assert recorded == (name != "full"), caplog.text
        if name == "full":
            warned = "".join(str(w.message) for w in recwarn)  # rank_zero_warn: a warning pytest may capture
            assert f"recording stopped (cannot write {small_disk}/block_001: no space left on device" in err + warned
        if name == "disk":
            assert (tmp_path / name / "window_inputs").is_dir() and not list((tmp_path / name).rglob("*.pt"))
    caplog.clear()
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / "cut", "--trainer.max_epochs=2", *runs["memory"]))
    assert code == 0
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / "cut", "--trainer.max_epochs=6", "--ckpt_path=last",
                                                           *runs["memory"]))
    assert code == 0 and not error_lines(err), err
    assert caplog.text.count("block 1's inputs of 16 batches recorded") == 2  # the first run's and the resumed one's
    killed = tmp_path / "killed"
    process = subprocess.Popen([sys.executable, "train.py", *windowed_fit(killed, "--trainer.max_epochs=6", *runs["disk"])],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "PYTHONPATH": str(Path.cwd()), "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 300
    while not list((killed / "window_inputs").glob("block_001/*.pt")):
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before it recorded"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)  # while recording, or in the window that uses the recording
    assert process.wait() == -signal.SIGKILL and list(killed.rglob("*.pt"))
    code, err = run_main(monkeypatch, capsys, windowed_fit(killed, "--trainer.max_epochs=6", "--ckpt_path=last", *runs["disk"]))
    assert code == 0 and not error_lines(err), err
    assert not list(killed.rglob("*.pt")) and not list((killed / "window_inputs").iterdir())  # nothing left behind
    packed = {name: packed_tensors(tmp_path / name / "packed") for name in (*runs, "cut", "killed")}
    for name in ("disk", "full", "cut", "killed"):
        assert packed[name].keys() == packed["memory"].keys(), name
        assert all(torch.equal(packed[name][k], packed["memory"][k]) for k in packed["memory"]), name


@pytest.mark.parametrize("damage", ["garbage", "truncated", "deleted"])
def test_a_recording_file_that_goes_bad_is_recomputed_with_one_warning(tmp_path, damage):
    teacher = tiny_flux(double=2, single=2)
    batches = [flux_batch(2, seed) for seed in range(3)]
    config = CalibrationConfig(block_inputs="teacher", window_blocks=1, window_inputs="disk",
                               window_inputs_dir=str(tmp_path / "inputs"))
    engine = Calibrator.build(teacher, TINY_VQ, config, guidance_scale=3.5, progress=False)
    engine.window.index = 1
    assert "recorded" in engine.record_window_inputs_(batches, len(batches))
    expected = engine.block_losses(batches[0])[0]
    first = next((tmp_path / "inputs").rglob("*.pt"))  # damaged behind the run's back
    if damage == "deleted":
        first.unlink()
    else:
        first.write_bytes(b"\x80\x02garbage" if damage == "garbage" else first.read_bytes()[: first.stat().st_size // 2])
    with pytest.warns(UserWarning, match="window inputs: cannot read .* the teacher runs from the model's input"):
        got = [engine.block_losses(batch)[0] for batch in batches]
    assert all(torch.equal(g, e) for g, e in zip(got, [expected])) and engine.window_inputs.stopped
    assert not list((tmp_path / "inputs").rglob("*.pt"))
