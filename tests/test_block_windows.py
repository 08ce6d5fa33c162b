"""Block-by-block calibration (issue 22: ``calibration.window_blocks``): K blocks at a time from the
teacher's block inputs, the other blocks outside the optimizer (and, with ``offload_blocks``, on the
CPU), a finished window hardened and its soft state freed, ``callbacks.BlockWindows`` moving on; on a
tiny DiT through ``train.py fit`` (export, resume mid-run) and on tiny SD3 / Flux with the engine."""

import copy
import logging
import re

import pytest
import torch
from torch import nn

from tests.test_calibration import fit_args, hard_block_mse
from tests.test_flux import flux_batch, tiny_flux
from tests.test_mmdit import SD35, SMALL, sd3_batch, sd3_embeddings, stock_pipeline, tiny_sd3, tiny_vae
from tests.test_prompts import write_embeddings
from tests.test_spread_blocks import packed_tensors
from tests.test_trust import error_lines, run_main
from train import cli_main
from vq4dit import VQConfig, load_dit, load_quantized, save_quantized
from vq4dit.engine import CalibrationConfig, Calibrator, block_losses, build_student
from vq4dit.engine.windows import BlockWindow, convert_own_, held_out
from vq4dit.lightning import CalibrationModule
from vq4dit.models import block_modules
from vq4dit.quantize import vq_layers

TINY_VQ = VQConfig(codebook_size=16, subvector_dim=2)
WINDOWED = CalibrationConfig(block_inputs="teacher", window_blocks=1)


def optimized(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"]}


def state_elements(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v) and v.dim())


def window_params(engine: Calibrator, inside: bool) -> list[nn.Parameter]:
    return [p for name, layer in engine.layers.items() if engine.window.owns_layer(name) == inside
            for p in layer.parameters()]


def step(engine: Calibrator, optimizer, batch, index: int) -> None:
    engine.update_codebook_trainability()
    engine.step_loss(batch, index).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    engine.prune_(optimizer)


def test_the_settings_are_checked_before_any_work(tmp_path, monkeypatch, capsys):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="window_blocks must be an integer"):
            CalibrationConfig(block_inputs="teacher", window_blocks=bad)
    with pytest.raises(ValueError, match="window_blocks needs block_inputs='teacher'"):
        CalibrationConfig(window_blocks=2)
    cases = [(["--model.calibration.window_blocks=2"], "window_blocks needs block_inputs='teacher'"),
             (["--model.offload_blocks=true"], "offload_blocks needs calibration.window_blocks"),
             (["--model.calibration.block_inputs=teacher", "--model.calibration.window_blocks=1",
               "--model.spread_blocks=true"], "does not combine with spread_blocks"),
             (["--model.calibration.block_inputs=teacher", "--model.calibration.window_blocks=1", "--trainer.devices=2",
               "--trainer.strategy=ddp"], "window_blocks runs in one process, got 2")]
    for extra, message in cases:
        code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, *extra))
        assert code != 0 and len(error_lines(err)) == 1 and message in error_lines(err)[0], err
        assert "teacher trajectories" not in err  # refused before any heavy work


def test_windows_cover_the_blocks_in_order_and_decide_the_placement():
    layers = {"a": 0, "b": 1, "c": 2, "d": 4, "outside": None}
    window = BlockWindow(layers, num_blocks=5, size=2, offload=True)
    seen = []
    while not window.done:
        seen.append(list(window.blocks))
        assert window.owns_layer("outside") == (window.index == 0)  # like rank 0 under a spread
        window.index += 1
    assert seen == [[0, 1], [2, 3], [4]] and window.num_windows == 3
    window.index = 1
    gpu = torch.device("cuda")  # only named: nothing moves
    assert [window.device_of(b, gpu).type for b in range(5)] == ["cpu", "cpu", "cuda", "cuda", "cpu"]
    assert window.describe() == "window 2/3 (blocks 2-3)"
    window.offload = False
    assert {window.device_of(b, gpu).type for b in range(5)} == {"cuda"}
    window.index = window.num_windows  # done: every block and layer counts, all on the device
    assert list(window.blocks) == list(range(5)) and window.owns_layer("d")


def test_held_out_blocks_keep_their_place_when_the_model_moves():
    """``CalibrationModule._apply``'s guard: Lightning's move of the whole module leaves the parked
    blocks where they are (here a dtype change shows what moved, on the CPU)."""
    teacher = load_dit("tiny")
    first, second = block_modules(teacher)
    with held_out(teacher, [first]):
        teacher.double()
    assert first.norm1.linear.weight.dtype == torch.float32 and second.norm1.linear.weight.dtype == torch.float64
    assert block_modules(teacher) == [first, second]  # put back in its place


def test_the_module_keeps_parked_blocks_where_they_are_and_reports_on_every_block():
    """``CalibrationModule``: a move of the whole module (here to float64, what a device move does to
    placement) leaves the blocks outside the window as they are; its validation error covers every
    block, one window at a time, as the whole-model computation does."""
    torch.manual_seed(0)
    module = CalibrationModule(model="tiny", recipe="paper", vq={"codebook_size": 16, "subvector_dim": 2},
                               calibration={"block_inputs": "teacher", "window_blocks": 1}, offload_blocks=True)
    module.configure_model()
    batches = [(torch.randn(2, 4, 8, 8), torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,)))]
    windowed = module.validation_error(batches)
    window, module.engine.window = module.engine.window, None
    whole = module.validation_error(batches)
    module.engine.window = window
    assert windowed["block_mse"] == pytest.approx(whole["block_mse"], rel=1e-6) and windowed["block_mse"] > 0
    module.double()
    first, second = block_modules(module.student)
    assert {p.dtype for p in first.parameters()} == {torch.float64} and module.teacher.pos_embed.proj.weight.dtype == torch.float64
    teachers = {id(p) for p in module.teacher.parameters()}  # the student shares the teacher's FP tensors: they go with it
    assert {p.dtype for p in second.parameters() if id(p) not in teachers} == {torch.float32}  # parked: outside the window
    assert module.student_offloaded  # SampleImages waits for the end
    module.engine.finish_windows_("cpu")
    assert not module.student_offloaded


def test_placement_moves_the_students_own_tensors_and_leaves_the_teachers():
    """Offloading moves a block's own tensors (VQ state, the student's copies); the FP tensors it
    shares with the teacher stay with the teacher (a dtype change shows what a device move would move)."""
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    engine = Calibrator.build(teacher, TINY_VQ, WINDOWED, progress=False)
    block = block_modules(engine.student)[0]
    teachers = {id(t) for t in (*teacher.parameters(), *teacher.buffers())}
    assert any(id(t) in teachers for t in block.parameters())  # the DiT student shares its FP tensors
    logits = block.attn1.to_q.candidate_logits
    convert_own_(block, lambda tensor: tensor.double() if tensor.is_floating_point() else tensor, teachers)
    assert block.attn1.to_q.candidate_logits is logits and logits.dtype == torch.float64  # the same Parameter
    assert {t.dtype for t in block.parameters() if id(t) not in teachers} == {torch.float64}
    assert {t.dtype for t in (*teacher.parameters(), *teacher.buffers()) if t.is_floating_point()} == {torch.float32}


def test_only_the_window_trains_and_finished_windows_are_hard_and_freed():
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    full = Calibrator.build(copy.deepcopy(teacher), TINY_VQ, CalibrationConfig(block_inputs="teacher"), progress=False)
    engine = Calibrator.build(teacher, TINY_VQ, WINDOWED, progress=False)
    engine.window.offload = True
    engine.place_("cpu")  # the CPU -> CPU move is a no-op; the decision is what the test reads
    parked = engine.window.parked(engine.student)
    assert parked == block_modules(engine.student)[1:] and {p.device.type for p in parked[0].parameters()} == {"cpu"}
    optimizer, full_optimizer = engine.make_optimizer(), full.make_optimizer()
    batches = [(torch.randn(4, 4, 8, 8), torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))) for _ in range(4)]
    start = hard_block_mse(teacher, build_student(teacher, TINY_VQ.with_overrides(num_candidates=1), progress=False),
                           batches)
    for index in range(2):
        step(full, full_optimizer, batches[index], index)
    for window in range(2):
        assert engine.window.index == window
        inside, outside = window_params(engine, True), window_params(engine, False)
        assert {id(p) for p in inside} >= optimized(optimizer) and not optimized(optimizer) & {id(p) for p in outside}
        assert not any(p.requires_grad for p in outside)
        for index in range(30):
            step(engine, optimizer, batches[index % 4], 30 * window + index)
            assert all(p.grad is None for p in outside)
            if index == 0 and window == 0:  # optimizer state scales with the window, not the model (1 of 2 blocks)
                assert 0 < state_elements(optimizer) < 0.6 * state_elements(full_optimizer)
        finished = [layer for name, layer in engine.layers.items() if engine.window.owns_layer(name)]
        later = [name for name in engine.layers if not engine.window.owns_layer(name)]
        # the stop rule and the hard fraction see every layer: the later windows' rows are still soft
        assert all(engine.soft_counts()[name][0] == engine.layers[name].num_subvectors for name in later if window == 0)
        engine.advance_window_(optimizer, "cpu")
        assert all(l.is_hard and l.candidate_logits.numel() == 0 and l.candidates.numel() == 0 for l in finished)
        assert not {id(p) for l in finished for p in l.parameters()} & {id(p) for p in optimizer.state}
    assert engine.window.done and all(layer.is_hard for layer in engine.layers.values())
    assert hard_block_mse(teacher, engine.student, batches) < start  # better than the nearest-codeword start


def windowed_fit(tmp_path, *extra):
    return fit_args(tmp_path, "--model.calibration.block_inputs=teacher", "--model.calibration.window_blocks=1",
                    "--model.offload_blocks=true", "--block_windows.max_steps=24", "--block_windows.min_codebook_steps=1000",
                    *extra)


def test_a_windowed_fit_calibrates_every_block_exports_and_resumes_at_its_window(tmp_path, monkeypatch, capsys, caplog,
                                                                                  recwarn):
    """16 steps an epoch, 24 steps a window: the first window ends at step 24, the run stops at the
    end of the second (step 48, in epoch 3). Stopped after epoch 2 (step 32, in the second window)
    and resumed, it continues in the second window and exports the uninterrupted run's model."""
    caplog.set_level(logging.INFO)
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / "whole", "--trainer.max_epochs=6"))
    assert code == 0 and not error_lines(err), err
    assert "window 1/2 (blocks 0-0) finished at step 24" in caplog.text and "report (48 steps)" in caplog.text
    assert all(layer.is_hard for layer in vq_layers(load_quantized(tmp_path / "whole" / "packed")).values())
    start, end = map(float, re.search(r"block MSE (\S+) -> (\S+) ", caplog.text).groups())
    assert end < start and "the start was kept" not in caplog.text  # below the soft start's argmax

    caplog.clear()
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / "cut", "--trainer.max_epochs=2"))
    warned = "".join(str(w.message) for w in recwarn)  # rank_zero_warn: a warning pytest may capture
    assert code == 0 and "stopped in window 2/2" in err + caplog.text + warned
    last = torch.load(next((tmp_path / "cut").rglob("last.ckpt")), weights_only=True)
    assert last["vq4dit"]["window"] == 1 and last["callbacks"]["BlockWindows"]["window_start"] == 24
    caplog.clear()
    code, err = run_main(monkeypatch, capsys, windowed_fit(tmp_path / "cut", "--trainer.max_epochs=6", "--ckpt_path=last"))
    assert code == 0 and not error_lines(err), err
    assert "finished at step" not in caplog.text and "report (48 steps)" in caplog.text
    whole, resumed = packed_tensors(tmp_path / "whole" / "packed"), packed_tensors(tmp_path / "cut" / "packed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("family, size, steps", [("sd3", 2, 40), ("flux", 1, 80)])
def test_mmdit_blocks_calibrate_window_by_window(tmp_path, family, size, steps):
    """Tuple-returning joint blocks (SD3: 3 blocks in windows of 2 and 1, the last block without a
    context stream; Flux: its double block, then its single block): every block calibrated, packed,
    better than the nearest-codeword start."""
    teacher = tiny_sd3(num_layers=3) if family == "sd3" else tiny_flux()
    batches = [sd3_batch(2, seed) if family == "sd3" else flux_batch(2, seed) for seed in range(3)]
    guidance = 4.0 if family == "sd3" else 3.5
    engine = Calibrator.build(teacher, TINY_VQ, CalibrationConfig(block_inputs="teacher", window_blocks=size),
                              guidance_scale=guidance, progress=False)
    start = build_student(teacher, TINY_VQ.with_overrides(num_candidates=1), progress=False)

    @torch.no_grad()
    def mse(student) -> float:
        return sum(float(block_losses(teacher, student, engine.model_batch(b), block_inputs="teacher")[0].mean())
                   for b in batches)

    optimizer, count = engine.make_optimizer(), 0
    while not engine.window.done:
        for index in range(steps):
            blocks = engine.window.blocks
            batch_mse = engine.step_loss(batches[index % 3], count).block_mse
            assert all(batch_mse[b] == 0 for b in range(batch_mse.numel()) if b not in blocks)
            step(engine, optimizer, batches[index % 3], count)
            count += 1
        engine.advance_window_(optimizer, "cpu")
    assert all(layer.is_hard for layer in engine.layers.values())
    assert mse(engine.student) < mse(start)
    save_quantized(engine.student, tmp_path / "packed")
    assert (tmp_path / "packed" / "diffusion_pytorch_model.safetensors").is_file()


def test_a_windowed_sd3_fit_exports_the_packed_transformer(tmp_path, monkeypatch, capsys, caplog):
    """``train.py fit`` of a tiny SD3.5 folder (3 joint blocks) in windows of 2 with offload: 6 steps an
    epoch, 6 steps a window, every layer hard in the packed transformer."""
    caplog.set_level(logging.INFO)
    pipe = stock_pipeline(tiny_sd3(num_layers=3, **SD35))
    pipe.register_modules(vae=tiny_vae())
    pipe.save_pretrained(tmp_path / "pipeline")
    embeds = write_embeddings(tmp_path / "e.safetensors", sd3_embeddings())
    model = ["--model.model", str(tmp_path / "pipeline"), "--data.prompt_embeds", str(embeds), *SMALL]
    args = fit_args(tmp_path, "--model.calibration.block_inputs=teacher", "--model.calibration.window_blocks=2",
                    "--model.offload_blocks=true", "--block_windows.max_steps=6", "--trainer.max_epochs=4", model=model)
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 0 and not error_lines(err), err
    assert "window 1/2 (blocks 0-1) finished at step 6" in caplog.text and "report (12 steps)" in caplog.text
    packed = load_quantized(tmp_path / "packed")
    assert len(vq_layers(packed)) > 0 and all(layer.is_hard for layer in vq_layers(packed).values())
