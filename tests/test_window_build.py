"""The student build window by window (``window_blocks`` with ``offload_blocks``): statistics and
k-means a window at a time, the layers outside window 0 moved off the device right after they are
built, the full ``E[x x^T]`` freed per window; bit-identical to the one-pass build (tiny SD3.5)."""

import logging

import pytest
import torch

from tests.test_allocation import QUALITY
from tests.test_mmdit import SD35, sd3_embeddings, tiny_sd3
from tests.test_spread_blocks import packed_tensors
from tests.test_trust_disk import small_disk  # noqa: F401  (a fixture)
from vq4dit import save_quantized
from vq4dit.engine import CalibrationConfig, Calibrator
from vq4dit.engine import calibrator as calibrator_module
from vq4dit.engine.probe import Phases
from vq4dit.engine.statistics import statistics_batches
from vq4dit.engine.window_build import build_by_window, layer_windows, state_bytes
from vq4dit.lightning import CalibrationModule
from vq4dit.models import block_modules
from vq4dit.quantize import select_layers

WINDOWED = CalibrationConfig(block_inputs="teacher", window_blocks=1)


def sd3_setup(count: int = 12):
    """A tiny SD3.5 (3 joint blocks) and ``count`` calibration items over a table of 3 prompts."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    items = {"x": torch.randn(count, 4, 8, 8, generator=g), "t": torch.linspace(900.0, 100.0, count),
             "prompt_index": torch.arange(count) % 3, **sd3_embeddings(3)}
    return tiny_sd3(num_layers=3, **SD35), items


@pytest.mark.parametrize("allocated, inputs", [(False, "recompute"), (True, "recompute"), (False, "memory"),
                                               (False, "disk")])
def test_the_windowed_build_is_bit_identical_to_the_one_pass_build(tmp_path, allocated, inputs):
    """Every layer's start (codebook, codes, candidates, ratio logits, row scales, bias), the
    activation statistics kept, and the packed export after the argmax: bit for bit; also with a
    reused allocation (a resume: layers built as the probe builds them, k = 8 and 32 beside 16), and
    with the statistics passes chained through recorded window inputs (then block 0 runs once per
    statistics batch, not once per window, and no recording is left)."""
    teacher, items = sd3_setup()
    names = [name for name, _, _ in select_layers(teacher, QUALITY, None)]
    allocation = {names[1]: {"codebook_size": 32}, names[-1]: {"codebook_size": 8}} if allocated else None
    build = dict(items=items, guidance_scale=4.0, progress=False, allocation=allocation)
    one_pass = Calibrator.build(teacher, QUALITY, WINDOWED, **build)
    chained = CalibrationConfig(block_inputs="teacher", window_blocks=1, window_inputs=inputs,
                                window_inputs_dir=str(tmp_path / "inputs") if inputs == "disk" else None)
    first = []
    handle = block_modules(teacher)[0].register_forward_hook(lambda *_: first.append(1))
    windowed = Calibrator.build(teacher, QUALITY, chained, offload_blocks=True, **build)
    handle.remove()
    assert len(first) == (2 if inputs != "recompute" else 3 * 2)  # 2 statistics batches; 3 windows
    assert not list(tmp_path.rglob("*.pt"))
    if allocated:
        assert windowed.layers[names[1]].codebook.shape[0] == 32 and windowed.layers[names[-1]].codebook.shape[0] == 8
    assert one_pass.layers.keys() == windowed.layers.keys() and len(windowed.layers) > 20
    for name, layer in one_pass.layers.items():
        mine, theirs = windowed.layers[name].state_dict(), layer.state_dict()
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine), name
        assert torch.equal(windowed.input_moments[name].diagonal, one_pass.input_moments[name].diagonal)
        assert windowed.input_moments[name].full is None
    assert windowed.phase_seconds["statistics"] > 0 and windowed.phase_seconds["feedback"] > 0
    for engine, folder in ((one_pass, "one"), (windowed, "windowed")):
        engine.finalize_()
        save_quantized(engine.student, tmp_path / folder)
    one, win = packed_tensors(tmp_path / "one"), packed_tensors(tmp_path / "windowed")
    assert one.keys() == win.keys() and all(torch.equal(one[k], win[k]) for k in one)


def test_the_build_holds_window_0_and_one_layer_on_the_device(caplog):
    """Parking on the meta device (a stand-in for the CPU when the teacher's device is the CPU):
    the layers outside window 0 leave the device right after they are built, so the device's VQ
    state peaks at window 0's plus one layer, far below the whole student's; each statistics pass
    stops after its window (block b runs in the passes of windows >= b)."""
    caplog.set_level(logging.INFO)
    teacher, items = sd3_setup()
    selected = select_layers(teacher, QUALITY, None)
    calls = [0] * len(block_modules(teacher))
    for index, block in enumerate(block_modules(teacher)):
        block.register_forward_pre_hook(lambda *_, index=index: calls.__setitem__(index, calls[index] + 1))
    layers, moments, ledger = build_by_window(teacher, selected, items, 4.0, 1, Phases(1, False), park_device="meta")
    windows, cpu = layer_windows(teacher, selected, 1), torch.device("cpu")
    first = [name for name, w in windows.items() if w in (0, None)]
    assert first and len(first) < len(layers) and ledger.parked == [n for n in layers if n not in first]
    for name, layer in layers.items():
        assert {t.device.type for t in layer.state_dict().values()} == ({"cpu"} if name in first else {"meta"}), name
    window0 = sum(state_bytes(layers[name], cpu) for name in first)
    one_layer = max(sum(t.numel() * t.element_size() for t in layer.state_dict().values())
                    for layer in layers.values())
    assert ledger.held == window0 and window0 < ledger.peak <= window0 + one_layer
    whole = sum(sum(t.numel() * t.element_size() for t in layer.state_dict().values()) for layer in layers.values())
    assert ledger.peak < 0.7 * whole
    batches = len(statistics_batches(items, 4.0))
    assert calls == [3 * batches, 2 * batches, 1 * batches]  # windows 0, 1, 2: each pass stops after its window
    assert all(m.full is None for m in moments.values()) and set(moments) == set(layers)
    assert "layers moved to meta; 3 statistics passes" in caplog.text


def test_the_module_builds_window_by_window_only_with_offload(monkeypatch):
    """``CalibrationModule.configure_model`` asks for the windowed build with ``offload_blocks``
    (and the one-pass build without it); on the CPU every block ends up on the CPU either way."""
    seen = []
    real = calibrator_module.build_by_window
    monkeypatch.setattr(calibrator_module, "build_by_window", lambda *a, **k: seen.append(a[4]) or real(*a, **k))
    for offload in (False, True):
        module = CalibrationModule(model="tiny", recipe="paper", vq={"codebook_size": 16, "subvector_dim": 2},
                                   calibration={"block_inputs": "teacher", "window_blocks": 1}, offload_blocks=offload)
        module.configure_model()
        assert module.engine.window.offload == offload and len(module.engine.layers) > 0
    assert seen == [1]


@pytest.mark.parametrize("windowed", [False, True])
def test_statistics_items_bound_the_builds_teacher_passes(windowed):
    """``statistics_items``: the statistics of the build use that many items (batches of 8) in the
    one-pass build and in the windowed one; the default takes all of 12 (2 batches)."""
    teacher, items = sd3_setup(12)
    seen = []
    handle = block_modules(teacher)[0].register_forward_pre_hook(lambda _m, args, kwargs: seen.append(
        kwargs["hidden_states"].shape[0]), with_kwargs=True)
    try:
        for most, rows in ((4, [8]), (1024, [16, 8])):  # model rows: the items and their negative copies
            seen.clear()
            config = CalibrationConfig(block_inputs="teacher", window_blocks=1 if windowed else None, statistics_items=most)
            Calibrator.build(teacher, QUALITY, config, guidance_scale=4.0, items=items, progress=False,
                             offload_blocks=windowed)
            passes = 3 if windowed else 1  # windowed: one statistics pass per window (each reaches block 0)
            assert seen == rows * passes, (most, seen)
    finally:
        handle.remove()
    with pytest.raises(ValueError, match="statistics_items must be an integer >= 1"):
        CalibrationConfig(statistics_items=0)


def test_a_chained_build_on_a_full_disk_falls_back_and_builds_the_same_layers(small_disk, caplog):  # noqa: F811
    from tests.test_window_inputs import fill

    caplog.set_level(logging.INFO)
    teacher, items = sd3_setup()
    build = dict(items=items, guidance_scale=4.0, progress=False, offload_blocks=True)
    plain = Calibrator.build(teacher, QUALITY, WINDOWED, **build)
    fill(small_disk)
    config = CalibrationConfig(block_inputs="teacher", window_blocks=1, window_inputs="disk",
                               window_inputs_dir=str(small_disk / "inputs"))
    chained = Calibrator.build(teacher, QUALITY, config, **build)
    assert "student build: window inputs: recording stopped (cannot write" in caplog.text
    assert "no space left on device" in caplog.text and not list(small_disk.rglob("*.pt"))
    for name, layer in plain.layers.items():
        mine, theirs = chained.layers[name].state_dict(), layer.state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
