"""Guards of the default recipe (issue 17.5): tests that fail when the default stops working.

Short real calibrations of the shipped digits DiT at regime-matched w2 (k=16, d=2), bit allocation
off (tests/test_allocation.py covers it), both recipes on the same items; the validation errors are
the ones ``callbacks.CalibrationReport`` measures at the start of fit (before the first step, every
soft row at its argmax) and at its end (the exported, hard model).
"""

import pytest

from callbacks import CalibrationReport
from callbacks.calibration_report import spread_indices
from tests.test_calibration import fit_args
from train import cli_main

SHORT_RUN = ["--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--model.allocation.enabled=false",
             "--trainer.max_epochs=3", "--trainer.callbacks=[]"]  # 48 steps, no sample grids
DEFAULT_RECIPE: list[str] = []  # the default as a user gets it


# The guards' run: 96 steps with the pruning callback (rows harden, as in a real fit), no sample grids.
GUARD_RUN = [*SHORT_RUN[:3], "--trainer.max_epochs=6", "--trainer.callbacks=[{class_path: callbacks.CandidatePruning}]"]


def calibration_report(tmp_path, *extra) -> CalibrationReport:
    cli = cli_main(fit_args(tmp_path, *extra, model=GUARD_RUN))
    report = next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))
    assert report.start is not None and report.end is not None
    return report


@pytest.fixture(scope="module")
def reports(tmp_path_factory) -> dict[str, CalibrationReport]:
    return {
        "default": calibration_report(tmp_path_factory.mktemp("default"), *DEFAULT_RECIPE),
        "paper": calibration_report(tmp_path_factory.mktemp("paper"), "--model.recipe=paper"),
    }


def test_default_is_at_most_half_the_paper_error(reports):
    """Measured: 0.019 vs 0.089 (0.21x); the default without its levers is the paper recipe (1x)."""
    default, paper = reports["default"].end["output_mse"], reports["paper"].end["output_mse"]
    assert default <= 0.5 * paper, (default, paper)


def test_calibration_lowers_the_error_below_its_own_start(reports):
    """A fit that does not calibrate (max_epochs=0, a broken step) ends at its start (1x).

    The paper recipe starts at the nearest codewords: its calibration must cut the output error
    (measured 0.55x in 96 steps; after 48 steps it was still above its start, 1.5x). The default
    starts at the error-feedback assignment, 7.6x lower, and 96 steps still lower it (measured 0.88x)."""
    for name, limit in (("paper", 0.85), ("default", 0.95)):
        start, end = reports[name].start["output_mse"], reports[name].end["output_mse"]
        assert end < limit * start, (name, start, end)


def test_3_bits_calibrates_through_its_codebook_phase_with_slow_row_scales(tmp_path):
    """At 3 bits (k=64, d=2) the error-feedback start is already close; with the row scales at
    ``lr_row_scale 3e-5`` the calibration must still end well below it after the codebooks and row
    scales trained alone (every layer hard after about 80 of 128 steps). Measured: 0.59x the start;
    a run that does not calibrate ends at 1x. The default's scale step (``lr_codebook``) ends this
    short run at 1.6x its start, its best check at 0.77x (docs/quality.md, "The row scales' step";
    on the full digits runs it ends at 0.50-1.05x)."""
    pruning = ("--trainer.callbacks=[{class_path: callbacks.CandidatePruning, init_args: {every_n_steps: 1, "
               "harden_threshold: 0.99, prune_floor: 0.01}}]")
    cli = cli_main(fit_args(tmp_path, "--trainer.max_epochs=8", pruning, "--model.calibration.lr_row_scale=3e-5",
                            model=["--model.vq.codebook_size=64", "--model.vq.subvector_dim=2"]))
    report = next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))
    assert report.end["output_mse"] < 0.75 * report.start["output_mse"], (report.start, report.end)


def test_argmax_view_is_the_exported_model_and_restores_the_soft_state():
    """What the report measures at the start: every soft row at its argmax, as finalize_model_ exports."""
    import copy

    import torch

    from vq4dit import VQConfig, VQLinear, finalize_model_
    from vq4dit.quantize import argmax_view

    torch.manual_seed(0)
    model = torch.nn.Sequential(VQLinear.from_linear(torch.nn.Linear(32, 16), VQConfig(codebook_size=16, subvector_dim=2,
                                                                                          num_candidates=3), "l"))
    soft_logits, soft_weight = model[0].candidate_logits.detach().clone(), model[0].weight().detach()
    hard = copy.deepcopy(model)
    finalize_model_(hard)
    with argmax_view(model):
        assert torch.equal(model[0].weight().detach(), hard[0].weight().detach())
    assert torch.equal(model[0].candidate_logits.detach(), soft_logits)
    assert torch.equal(model[0].weight().detach(), soft_weight) and not torch.equal(soft_weight, hard[0].weight().detach())


def test_a_calibration_that_ends_worse_than_its_start_exports_its_start(tmp_path):
    """A far too high ratio and codebook learning rate scrambles a good start: the report returns the
    student to its start (every soft row at its argmax), and that is the model exported."""
    import torch

    from vq4dit import load_quantized
    from vq4dit.quantize import vq_layers

    cli = cli_main(fit_args(tmp_path, "--model.calibration.lr_logits=50", "--model.calibration.lr_codebook=0.05",
                            model=SHORT_RUN))
    report = next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))
    order = [type(c).__name__ for c in cli.trainer.callbacks]
    assert order.index("CalibrationReport") < order.index("FinalAssignment")  # kept before the export
    assert report.end["output_mse"] > report.start["output_mse"] and report.kept_start
    assert report.kept["output_mse"] == pytest.approx(report.start["output_mse"], rel=1e-4)
    packed, student = vq_layers(load_quantized(tmp_path / "packed")), vq_layers(cli.model.student)
    assert packed.keys() == student.keys()
    for name, layer in packed.items():
        assert layer.is_hard and torch.equal(layer.codes.long(), student[name].codes.long())



def test_a_resumed_calibration_that_ends_worse_keeps_the_same_start(tmp_path):
    """Stopped after one epoch and resumed, a run whose calibration scrambles its start exports the
    same start as the uninterrupted run (the resumed run builds its student again, the first run's
    start, before the checkpoint is loaded over it)."""
    import torch
    from safetensors.torch import load_file

    from tests.test_trust import LONG

    scramble = ["--model.calibration.lr_logits=50", "--model.calibration.lr_codebook=0.05", *SHORT_RUN[:3], *LONG]
    report = lambda cli: next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert report(cli_main(fit_args(straight, "--trainer.max_epochs=2", *scramble))).kept_start
    cli_main(fit_args(resumed, "--trainer.max_epochs=1", *scramble))
    again = report(cli_main(fit_args(resumed, "--trainer.max_epochs=2", "--ckpt_path=last", *scramble)))
    assert again.kept_start and again.start is not None
    a, b = (load_file(str(folder / "packed" / "diffusion_pytorch_model.safetensors")) for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# The paper recipe's nearest-codeword start improves while the ratios learn (measured: 0.78x the start
# at step 20); layers harden at a top ratio of 0.9 (about step 21), then a far too high codebook step
# scrambles them (200x the start by step 32).
LATE_SCRAMBLE = ["--model.recipe=paper", "--model.calibration.lr_codebook=0.05", "--calibration_report.every_n_steps=2",
                 *SHORT_RUN[:3],
                 "--trainer.callbacks=[{class_path: callbacks.CandidatePruning, init_args: {harden_threshold: 0.9}}, "
                 "{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"]


def test_a_calibration_that_ends_worse_than_a_check_exports_the_best_check(tmp_path):
    """With checks every 2 steps, the state kept is the best check's (not the start's, not the
    end's): the exported model is that state at its argmax, and measured again it gives the
    check's validation error."""
    import torch

    from vq4dit import load_quantized
    from vq4dit.quantize import vq_layers

    cli = cli_main(fit_args(tmp_path, "--trainer.max_epochs=2", *LATE_SCRAMBLE))
    report = next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))
    assert report.best_step > 0 and report.kept_step == report.best_step and not report.kept_start
    assert report.best["output_mse"] < report.start["output_mse"] < report.end["output_mse"], (report.start, report.best, report.end)
    assert report.kept["output_mse"] == pytest.approx(report.best["output_mse"], rel=1e-4)
    packed, student = vq_layers(load_quantized(tmp_path / "packed")), vq_layers(cli.model.student)
    for name, layer in packed.items():
        assert layer.is_hard and torch.equal(layer.codes.long(), student[name].codes.long())
        assert torch.equal(layer.codebook, student[name].codebook)
    # the measured batches cover the trajectory, from its noisiest step to its last (the items are in sampling order)
    loader = list(cli.datamodule.val_dataloader())
    picked = torch.cat([b["t"] if isinstance(b, dict) else b[1] for i, b in enumerate(loader)
                        if i in spread_indices(len(loader), report.max_batches)])
    every = torch.cat([b["t"] if isinstance(b, dict) else b[1] for b in loader])
    assert len(loader) > report.max_batches and picked.max() == every.max() and picked.min() == every.min()


def test_spread_indices():
    assert spread_indices(50, 4) == {0, 16, 33, 49}
    assert spread_indices(3, 4) == {0, 1, 2} and spread_indices(10, 1) == {0} and spread_indices(0, 4) == set()


def test_a_resumed_calibration_keeps_the_best_check_of_the_first_run(tmp_path):
    """The best check's state travels in the checkpoint: stopped after two epochs (its best check in
    them) and resumed, the run exports what the uninterrupted run exports."""
    import torch
    from safetensors.torch import load_file

    report = lambda cli: next(c for c in cli.trainer.callbacks if isinstance(c, CalibrationReport))  # noqa: E731
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = report(cli_main(fit_args(straight, "--trainer.max_epochs=3", *LATE_SCRAMBLE)))
    assert first.kept_step is not None and 0 < first.kept_step < 32  # in the first two epochs (16 steps each)
    stopped = report(cli_main(fit_args(resumed, "--trainer.max_epochs=2", *LATE_SCRAMBLE)))
    assert stopped.best_step == first.kept_step
    again = report(cli_main(fit_args(resumed, "--trainer.max_epochs=3", "--ckpt_path=last", *LATE_SCRAMBLE)))
    assert again.kept_step == first.kept_step
    a, b = (load_file(str(folder / "packed" / "diffusion_pytorch_model.safetensors")) for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
