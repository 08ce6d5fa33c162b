"""The calibration engine without Lightning: the README's ten-line loop, and the same model as a
Lightning fit of the same settings (the LightningModule is only an adapter)."""

import pytest
import torch
from safetensors.torch import load_file

from train import cli_main
from vq4dit import VQConfig, load_dit, save_quantized
from vq4dit.engine import CalibrationConfig, Calibrator, RegularizerGate, block_losses, build_student, with_null_labels
from vq4dit.quantize import vq_layers
from vq4dit.sampling import SamplerConfig
from vq4dit.trajectories import ShuffledBatches, TrajectoryPlan, generate_items

TINY_VQ = VQConfig(codebook_size=16, subvector_dim=2)
SAMPLER = SamplerConfig(num_steps=8, guidance_scale=4.0)


def calibrate_without_lightning(teacher, epochs: int) -> Calibrator:
    """The README's "Library use" loop (plus the epoch-seeded shuffle of the data module)."""
    engine = Calibrator.build(teacher, TINY_VQ, CalibrationConfig(), guidance_scale=4.0, progress=False)
    items = generate_items(teacher, [0, 1], TrajectoryPlan(0, 4, 1000, SAMPLER), progress=False)
    optimizer, step = engine.make_optimizer(), 0
    for epoch in range(epochs):
        for batch in ShuffledBatches(items, batch_size=4, seed=0, shuffle=True, epoch_fn=lambda: epoch):
            engine.update_codebook_trainability()
            engine.step_loss(batch, step).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            engine.prune_(optimizer, harden_threshold=0.99, prune_floor=0.01)
    engine.finalize_()
    return engine


def test_ten_line_loop_calibrates(tmp_path):
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    engine = calibrate_without_lightning(teacher, epochs=4)
    assert all(layer.is_hard for layer in engine.layers.values())
    val = generate_items(teacher, [2], TrajectoryPlan(0, 4, 1000, SAMPLER), progress=False)
    batches = [(val["x"][i : i + 4], val["t"][i : i + 4], val["y"][i : i + 4]) for i in range(0, 32, 4)]
    start = build_student(teacher, TINY_VQ.with_overrides(num_candidates=1), progress=False)

    @torch.no_grad()
    def mse(student) -> float:
        return sum(float(block_losses(teacher, student, *with_null_labels(*b))[0].mean()) for b in batches)

    assert mse(engine.student) < 0.8 * mse(start)  # better than the k-means start
    save_quantized(engine.student, tmp_path / "packed")
    assert (tmp_path / "packed" / "diffusion_pytorch_model.safetensors").is_file()


def test_lightning_fit_is_the_engine_loop(tmp_path):
    """Same seeds and settings: the CLI fit and the plain loop export bit-identical models."""
    cli_main([
        "fit", "--config", "configs/demo.yaml", "--model.model=tiny", "--model.recipe=paper", "--model.vq.codebook_size=16",
        "--model.vq.subvector_dim=2", "--data.num_classes=1000", "--data.num_trajectories=2", "--data.num_steps=8",
        "--data.val_trajectories=0", "--trainer.max_epochs=3", "--trainer.logger=false",
        "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", f"--model.export.dir={tmp_path / 'cli'}",
        "--trainer.callbacks=[{class_path: callbacks.CandidatePruning, init_args: {histogram_every_n_steps: 0}}]",
    ])
    torch.manual_seed(0)  # seed_everything(0): the tiny preset's random weights
    engine = calibrate_without_lightning(load_dit("tiny"), epochs=3)
    save_quantized(engine.student, tmp_path / "plain")
    cli, plain = load_file(str(tmp_path / "cli" / "diffusion_pytorch_model.safetensors")), load_file(str(tmp_path / "plain" / "diffusion_pytorch_model.safetensors"))
    assert cli.keys() == plain.keys()
    assert [k for k in cli if not torch.equal(cli[k], plain[k])] == []


def test_regularizer_gate_follows_the_official_rule():
    gate = RegularizerGate(window=3)
    # step 0 resets; a value applies only when above the running minimum
    assert [gate(v, s) for s, v in enumerate([5.0, 4.0, 4.5, 9.0, 8.0])] == [False, False, True, False, False]
    assert RegularizerGate(window=3, enabled=False)(1.0, 0)


def test_prune_shrinks_optimizer_state_with_the_logits():
    torch.manual_seed(0)
    engine = Calibrator.build(load_dit("tiny"), TINY_VQ, progress=False)
    optimizer = engine.make_optimizer()
    layer = next(iter(engine.layers.values()))
    with torch.no_grad():
        layer.candidate_logits[: layer.num_soft // 2, 0] = 50.0  # half the rows confident
    layer.candidate_logits.grad = torch.ones_like(layer.candidate_logits)
    optimizer.step()
    before = layer.num_soft
    engine.prune_(optimizer)
    assert 0 < layer.num_soft < before
    state = optimizer.state[layer.candidate_logits]["square_avg"]
    assert state.shape == layer.candidate_logits.shape
    assert any(p is layer.candidate_logits for group in optimizer.param_groups for p in group["params"])


def test_codebooks_train_once_their_layer_is_hard():
    torch.manual_seed(0)
    engine = Calibrator.build(load_dit("tiny"), TINY_VQ, progress=False)
    assert not any(l.codebook.requires_grad for l in engine.layers.values())
    assert engine.finalize_() > 0
    assert all(l.codebook.requires_grad for l in engine.layers.values())
    simultaneous = Calibrator.build(load_dit("tiny"), TINY_VQ, CalibrationConfig(codebook_training="simultaneous"), progress=False)
    assert all(l.codebook.requires_grad for l in simultaneous.layers.values())
    assert engine.make_optimizer().defaults["alpha"] == 0.9  # the official RMSprop
    smoother = Calibrator(engine.teacher, engine.student, CalibrationConfig(rmsprop_alpha=0.99))
    assert smoother.make_optimizer().defaults["alpha"] == 0.99


@pytest.mark.parametrize("lr_row_scale", [0.0, None])
def test_row_scales_train_at_their_own_rate(lr_row_scale):
    """``lr_row_scale=0`` keeps the row scales at their start (the rows' RMS) while the codebooks
    train; None (the default) trains them at ``lr_codebook``."""
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    engine = Calibrator.build(teacher, TINY_VQ.with_overrides(row_scale=True),
                              CalibrationConfig(lr_row_scale=lr_row_scale), progress=False)
    engine.finalize_()  # every layer hard: codebooks and scales train
    start = {n: (l.codebook.detach().clone(), l.row_scales.detach().clone()) for n, l in engine.layers.items()}
    items = generate_items(teacher, [0, 1], TrajectoryPlan(0, 2, 1000, SAMPLER), progress=False)
    optimizer = engine.make_optimizer()
    for step, batch in enumerate(ShuffledBatches(items, batch_size=4, seed=0, shuffle=True, epoch_fn=lambda: 0)):
        engine.update_codebook_trainability()
        engine.step_loss(batch, step).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    for name, layer in engine.layers.items():
        codebook, scales = start[name]
        assert not torch.equal(layer.codebook, codebook), name
        assert torch.equal(layer.row_scales, scales) == (lr_row_scale == 0.0), name


def test_a_row_scale_rate_without_row_scales_is_one_error_line(tmp_path, monkeypatch, capsys):
    from tests.test_calibration import fit_args
    from tests.test_trust import error_lines, run_main

    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.recipe=paper", "--model.calibration.lr_row_scale=3e-5"))
    assert code != 0 and len(error_lines(err)) == 1 and "lr_row_scale needs vq.row_scale" in error_lines(err)[0], err
    assert "teacher trajectories" not in err  # refused before any heavy work


@pytest.mark.parametrize(
    "field, value", [("block_inputs", "both"), ("optimizer", "sgd"), ("lr_logits", -1.0), ("lr_row_scale", -1e-4),
                     ("gate_window", 0),
                     ("regularizer_weight", float("nan")), ("rmsprop_alpha", 1.0)],
)
def test_invalid_calibration_config(field, value):
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**{field: value})


def test_engine_needs_vq_layers():
    with pytest.raises(ValueError, match="no VQLinear"):
        Calibrator(load_dit("tiny"), load_dit("tiny"))
    assert vq_layers(build_student(load_dit("tiny"), TINY_VQ, progress=False))


def test_readme_library_loop_runs(tmp_path, monkeypatch):
    """The README's "Calibrate without Lightning" block, as printed (one trajectory instead of 8)."""
    import re
    from pathlib import Path

    readme = Path("README.md").read_text()
    block = readme.split("Calibrate without Lightning")[1].split("```python\n")[1].split("```")[0]
    block = block.replace("range(8)", "range(1)")
    assert re.search(r"engine\.prune_\(optimizer\)", block) and "save_quantized(engine.student" in block
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert all(layer.is_hard for layer in namespace["engine"].layers.values())
    assert (tmp_path / "out" / "reference-w2" / "diffusion_pytorch_model.safetensors").is_file()


def test_pruned_candidates_are_not_divergence():
    """A pruned candidate's logit is -inf by design; NaN or +inf is divergence."""
    from vq4dit.models import NonFiniteError

    torch.manual_seed(0)
    engine = Calibrator.build(load_dit("tiny"), TINY_VQ.with_overrides(num_candidates=3), progress=False)
    layer = next(iter(engine.layers.values()))
    with torch.no_grad():
        layer.candidate_logits[:5, 2] = float("-inf")
    engine.check_finite_(0)
    with torch.no_grad():
        layer.candidate_logits[7, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="step 3.*" + next(iter(engine.layers)).replace(".", r"\.")):
        engine.check_finite_(3)


def test_activation_aware_codebooks_fit_the_weighted_metric():
    """k-means under E[x^2]: lower output error where inputs are large than plain k-means."""
    from vq4dit.kmeans import kmeans
    from vq4dit.codewords import nearest_codewords

    torch.manual_seed(0)
    points = torch.randn(4096, 2)
    weights = torch.tensor([[100.0, 0.01]]).expand(4096, 2).contiguous()  # dim 0 matters, dim 1 hardly
    def weighted_error(codebook):
        index, _ = nearest_codewords(points, codebook, 1, weights)
        return ((points - codebook[index[:, 0]]).pow(2) * weights).sum().item()
    plain, aware = kmeans(points, 16, iters=10), kmeans(points, 16, iters=10, weights=weights)
    assert weighted_error(aware) < 0.5 * weighted_error(plain)


def test_activation_metric_needs_items_and_builds_with_them():
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    vq = TINY_VQ.with_overrides(kmeans_metric="activation")
    with pytest.raises(ValueError, match="need calibration items"):
        Calibrator.build(teacher, vq, progress=False)
    items = generate_items(teacher, [0], TrajectoryPlan(0, 2, 1000, SAMPLER), progress=False)
    engine = Calibrator.build(teacher, vq, guidance_scale=4.0, progress=False, items=items)
    euclidean = build_student(teacher, TINY_VQ, progress=False)
    changed = [n for n, l in engine.layers.items() if not torch.equal(l.codebook, vq_layers(euclidean)[n].codebook)]
    assert len(changed) == len(engine.layers)  # every codebook follows the activation metric


def test_recipes_choose_the_levers_and_flags_override_them():
    from vq4dit.lightning import CalibrationModule

    small = {"codebook_size": 16, "subvector_dim": 2}
    default = CalibrationModule(model="tiny", vq=small)
    paper = CalibrationModule(model="tiny", vq=small, recipe="paper")
    explicit = CalibrationModule(model="tiny", vq={**small, "row_scale": False})
    assert default.vq_config.row_scale is True and explicit.vq_config.row_scale is False
    assert (paper.vq_config.row_scale, paper.vq_config.kmeans_metric, paper.calibration.output_weight) == (False, "euclidean", 0.0)
    assert (default.vq_config.error_feedback, default.vq_config.ratio_init) == (True, "confident")
    assert (paper.vq_config.error_feedback, paper.vq_config.ratio_init) == (False, "inverse_distance")
    assert (default.allocation.enabled, paper.allocation.enabled) == (False, False)  # opt-in (recipes.py)
    other = CalibrationModule(model="tiny", vq={**small, "error_feedback": False, "ratio_init": "uniform"})
    assert (other.vq_config.error_feedback, other.vq_config.ratio_init, other.vq_config.row_scale) == (False, "uniform", True)
    with pytest.raises(ValueError, match="recipe"):
        CalibrationModule(model="tiny", recipe="fast")
