"""Bit allocation under a budget (``--model.allocation.budget``): the options, the knapsack solver against
brute force, the sensitivities measured on a real model, and the CLI run that uses them."""

import itertools
import random

import pytest
import torch
from safetensors.torch import load_file

from tests.test_calibration import fit_args
from tests.test_trust import error_lines, run_main
from vq4dit import VQConfig, load_dit, load_quantized
from vq4dit.engine import with_null_labels
from vq4dit.engine import Calibrator
from vq4dit.engine.allocation import (
    AllocationConfig, LayerChoice, allocate_bits, allocation_options, cheapest_bits_per_weight, mean_bits_per_weight,
    measure_sensitivity, solve_allocation,
)
from vq4dit.engine.probe import (
    Phases, build_choice, check_allocation, gather_statistics, layer_gains, layer_output_error, output_mse,
    probe_allocation, swapped,
)
from vq4dit.engine.statistics import item_batches, strided_items
from vq4dit.layers import InputMoments, VQLinear
from vq4dit.quantize import select_layers, vq_layers


def test_options_span_codebook_sizes_around_the_base():
    config = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=2)
    assert [o.codebook_size for o in allocation_options(config, 64, 64)] == [4, 8, 16, 32, 64]
    assert [o.codebook_size for o in allocation_options(config, 64, 64, span=1)] == [8, 16, 32]
    # k never below max(2, n) nor above the number of sub-vectors (4 x 4 / 2 = 8)
    assert [o.codebook_size for o in allocation_options(config.with_overrides(num_candidates=8), 4, 4)] == [8]
    assert all(o.subvector_dim == 2 and o.num_candidates == 2 for o in allocation_options(config, 64, 64))


def brute_force(layers, budget):
    total = sum(layer.num_weights for layer in layers)
    best = None
    for picks in itertools.product(*(range(len(layer.configs)) for layer in layers)):
        bits = sum(layer.bits[i] * layer.num_weights for layer, i in zip(layers, picks)) / total
        if bits <= budget + 1e-12:
            score = sum(layer.scores[i] for layer, i in zip(layers, picks))
            best = score if best is None else min(best, score)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_solver_meets_the_budget_and_is_near_the_exact_optimum(seed):
    rng = random.Random(seed)
    layers = []
    for index in range(5):
        weights = rng.choice([1024, 4096, 16384])
        bits = sorted(rng.uniform(0.5, 4.5) for _ in range(4))
        # convex-ish decreasing errors with a random per-layer sensitivity
        scale = rng.uniform(0.1, 10)
        scores = [scale * 2 ** (-2 * b) * rng.uniform(0.8, 1.2) for b in bits]
        layers.append(LayerChoice(f"l{index}", weights, [VQConfig()] * 4, bits, scores))
    budget = rng.uniform(1.5, 3.5)
    choice = solve_allocation(layers, budget)
    total = sum(layer.num_weights for layer in layers)
    spent = sum(layer.bits[choice[layer.name]] * layer.num_weights for layer in layers) / total
    assert spent <= budget + 1e-9
    optimum = brute_force(layers, budget)
    found = sum(layer.scores[choice[layer.name]] for layer in layers)
    assert found <= optimum * (1 + 1e-3)  # the DP's rounding of costs to 1/8192 of the budget costs ~nothing
    uniform = [min(range(4), key=lambda i: abs(layer.bits[i] - budget)) for layer in layers]
    if sum(layer.bits[i] * layer.num_weights for layer, i in zip(layers, uniform)) / total <= budget:
        assert found <= sum(layer.scores[i] for layer, i in zip(layers, uniform)) + 1e-12


def test_solver_refuses_a_budget_below_the_cheapest_choice():
    layers = [LayerChoice("a", 100, [VQConfig()] * 2, [1.0, 2.0], [2.0, 1.0])]
    with pytest.raises(ValueError, match="below the cheapest allocation"):
        solve_allocation(layers, 0.9)
    assert solve_allocation(layers, 1.0) == {"a": 0}
    assert solve_allocation(layers, 5.0) == {"a": 1}


def test_sensitivities_are_measured_on_the_model_and_leave_it_unchanged():
    torch.manual_seed(0)
    teacher = load_dit("tiny").eval()
    config = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=1)
    selected = select_layers(teacher, config, include=["transformer_blocks.0.norm1.linear", "transformer_blocks.1.ff.net.2"])
    x, t, y = torch.randn(4, 4, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([1, 2, 3, 4])
    batches = [with_null_labels(x, t, y)]
    with torch.no_grad():
        before = teacher(*batches[0][:1], timestep=batches[0][1], class_labels=batches[0][2]).sample
    layers = measure_sensitivity(teacher, selected, batches, span=2, progress=False)
    with torch.no_grad():
        after = teacher(*batches[0][:1], timestep=batches[0][1], class_labels=batches[0][2]).sample
    assert torch.equal(before, after) and not vq_layers(teacher)
    for layer in layers:
        assert [c.codebook_size for c in layer.configs] == [4, 8, 16, 32, 64]
        assert all(s > 0 for s in layer.scores)
        assert layer.scores[0] > layer.scores[-1]  # 4 codewords hurt more than 64
        assert layer.bits == sorted(layer.bits)
    allocation = allocate_bits(teacher, selected, batches, budget=None, span=2, progress=False)
    uniform = sum(c.stored_bits_per_weight(m.out_features, m.in_features) * m.weight.numel() for _, m, c in selected)
    uniform /= sum(m.weight.numel() for _, m, _ in selected)
    assert allocation.budget == pytest.approx(uniform)
    assert allocation.bits_per_weight <= uniform + 1e-9
    cheapest = cheapest_bits_per_weight(selected)
    assert cheapest < uniform
    assert set(allocation.overrides()) == {name for name, _, _ in selected}


def test_cli_budget_allocates_and_resume_reuses_the_allocation(tmp_path, monkeypatch, capsys):
    budget = ["--model.allocation.enabled=true", "--model.allocation.budget=1.9", "--trainer.callbacks=[{class_path: callbacks.CandidatePruning}, "
              "{class_path: pytorch_lightning.callbacks.ModelCheckpoint, init_args: {save_last: true}}]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    code, err = run_main(monkeypatch, capsys, fit_args(straight, "--trainer.max_epochs=2", *budget))
    assert code == 0 and "bit allocation: budget 1.900 b/w" in err
    student = load_quantized(straight / "packed")
    layers = vq_layers(student).values()
    numel = lambda layer: layer.in_features * layer.out_features  # noqa: E731
    bits = sum(layer.bits_per_weight() * numel(layer) for layer in layers) / sum(map(numel, layers))
    assert bits <= 1.9 + 1e-9
    assert len({layer.config.codebook_size for layer in layers}) > 1  # not one k for all
    assert run_main(monkeypatch, capsys, fit_args(resumed, "--trainer.max_epochs=1", *budget))[0] == 0
    code, err = run_main(monkeypatch, capsys, fit_args(resumed, "--trainer.max_epochs=2", "--ckpt_path=last", *budget))
    assert code == 0 and "resuming from" in err and "bit allocation: budget" not in err  # reused, not measured
    a, b = (load_file(str(folder / "packed" / "diffusion_pytorch_model.safetensors")) for folder in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_budget_below_the_cheapest_allocation_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.allocation.enabled=true", "--model.allocation.budget=0.5"))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert "bit_budget 0.5 is below the cheapest allocation" in line
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.allocation.budget=2", "--model.allocation.enabled=false"))
    assert code == 2 and "bit_budget needs bit_allocation" in error_lines(err)[0]


# ------------------------------------------------------------------ predicted sensitivity (probe)
def tiny_items(count=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(count, 4, 8, 8, generator=generator), "t": torch.randint(0, 1000, (count,), generator=generator),
            "y": torch.randint(0, 10, (count,), generator=generator)}


QUALITY = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=2, row_scale=True, kmeans_metric="activation",
                   error_feedback=True, ratio_init="confident")


def test_predicted_layer_error_is_the_layer_output_mse_on_its_inputs():
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 24)
    inputs = torch.randn(500, 32) * torch.linspace(0.1, 3, 32)  # uneven input scales
    hessian = inputs.t() @ inputs / inputs.shape[0]
    layer = VQLinear.from_linear(linear, QUALITY.with_overrides(codebook_size=8), "l", InputMoments.from_full(hessian))
    with torch.no_grad():
        measured = (layer(inputs) - linear(inputs)).pow(2).mean().item()
    assert layer_output_error(linear, layer, hessian) == pytest.approx(measured, rel=1e-4)


def probe_inputs(**select):
    """The tiny DiT (frozen), its selected layers, calibration items, a silent ``Phases`` and the
    layers' input moments (with ``E[x x^T]``)."""
    torch.manual_seed(0)
    teacher = load_dit("tiny").eval().requires_grad_(False)
    selected = select_layers(teacher, QUALITY, **select)
    items = tiny_items()
    phases = Phases(0, progress=False)
    return teacher, selected, items, phases, gather_statistics(teacher, selected, items, 4.0, True, phases)


def test_probe_scores_are_gain_times_prediction_and_the_model_is_left_unchanged():
    teacher, selected, items, phases, hessians = probe_inputs()
    config = AllocationConfig(gain_items=8, check_items=8)
    allocation, built = probe_allocation(teacher, selected, hessians, items, 4.0, None, config, phases)
    assert not vq_layers(teacher)  # every layer swapped back
    assert allocation.bits_per_weight <= allocation.budget + 1e-9
    assert allocation.budget == pytest.approx(mean_bits_per_weight(selected))
    assert set(phases.seconds) >= {"statistics", "kmeans", "feedback", "probe", "check"}
    gain_batches = item_batches(items, strided_items(48, 16)[0::2], 4.0, batch_size=32)
    _, reference = output_mse(teacher, gain_batches)
    for layer, (name, linear, base) in zip(allocation.layers, selected):
        assert [c.codebook_size for c in layer.configs] == [8, 16, 32]  # span 1: never below k / 2
        assert [b.config for b in built[name]] == [base, *(c for c in layer.configs if c != base)]  # all in full
        assert layer.predicted == pytest.approx([layer_output_error(linear, built[name][[b.config for b in built[name]]
                                                 .index(c)], hessians[name].full) for c in layer.configs])
        assert layer.predicted[0] > layer.predicted[1] > layer.predicted[2] > 0
        assert layer.scores == pytest.approx([layer.gain * p for p in layer.predicted])
        with swapped(teacher, {name: built[name][0]}):  # the block-local gain: near the measured final MSE
            measured = output_mse(teacher, gain_batches, reference)[0]
        assert 0.5 < layer.scores[layer.base] / measured < 2.0
    check = allocation.check
    assert check["items"] == 2 * 8 and check["kept"] == (check["allocated_mse"] <= check["uniform_mse"])
    assert allocation.notes[-1] in allocation.format()


def test_block_local_gains_are_exact_with_one_layer_per_block_and_need_one_model_forward_per_block():
    teacher, selected, items, _, hessians = probe_inputs(include=["*.ff.net.2"])  # one layer per block
    layers = {name: VQLinear.from_linear(linear, config, name, hessians[name]) for name, linear, config in selected}
    predicted = {name: layer_output_error(linear, layers[name], hessians[name].full) for name, linear, _ in selected}
    batches = item_batches(items, torch.arange(8), 4.0, batch_size=32)
    forwards = []
    gains = layer_gains(teacher, layers, predicted, batches, on_forward=lambda: forwards.append(1))
    assert len(forwards) == 1 + len(teacher.transformer_blocks) == 1 + len(selected)  # recording + one per block
    assert not vq_layers(teacher)
    _, reference = output_mse(teacher, batches)
    for name, layer in layers.items():  # alone in its block: gain x predicted is its measured final MSE
        with swapped(teacher, {name: layer}):
            assert gains[name] * predicted[name] == pytest.approx(output_mse(teacher, batches, reference)[0], rel=1e-4)


def test_drafted_options_are_cheaper_and_the_chosen_ones_are_built_in_full(monkeypatch):
    import vq4dit.assignment

    iterations = []
    real = vq4dit.assignment.kmeans
    monkeypatch.setattr(vq4dit.assignment, "kmeans", lambda *a, **k: iterations.append(a[2]) or real(*a, **k))
    teacher, selected, items, phases, hessians = probe_inputs()
    config = AllocationConfig(gain_items=8, check_items=8, probe_kmeans_iters=1)
    allocation, built = probe_allocation(teacher, selected, hessians, items, 4.0, None, config, phases)
    assert iterations.count(1) == 3 * len(selected)  # drafts of k / 2, k (for the full-to-draft ratio), 2 k
    moved = sum(allocation.choice[layer.name] != layer.base for layer in allocation.layers)
    assert iterations.count(QUALITY.kmeans_iters) == len(selected) + moved  # the bases, then the chosen others
    for layer in allocation.layers:
        assert layer.configs[allocation.choice[layer.name]] in [b.config for b in built[layer.name]]
        assert all(b.config.kmeans_iters == QUALITY.kmeans_iters for b in built[layer.name])


def test_check_falls_back_to_uniform_when_the_allocation_is_worse():
    teacher, selected, items, phases, hessians = probe_inputs()
    allocation, built = probe_allocation(teacher, selected, hessians, items, 4.0, None,
                                         AllocationConfig(gain_items=8, check_items=0), phases)
    # a worse choice at fewer bits: every layer at k / 2
    allocation.choice = {layer.name: 0 for layer in allocation.layers}
    build_choice(allocation, selected, hessians, built, phases, AllocationConfig())
    batches = item_batches(items, torch.arange(40, 48), 4.0)
    assert not check_allocation(teacher, allocation, built, batches)
    assert allocation.choice == {layer.name: layer.base for layer in allocation.layers}
    assert allocation.check["allocated_mse"] > allocation.check["uniform_mse"]
    assert allocation.format().splitlines()[-1].startswith("bit allocation fell back to uniform")


def test_the_cli_prints_the_fallback_line_and_exports_the_uniform_setting(tmp_path, monkeypatch, capsys):
    from vq4dit.engine import probe

    worst = lambda layers, budget: {layer.name: 0 for layer in layers}  # noqa: E731  every layer at k / 2
    monkeypatch.setattr(probe, "solve_allocation", worst)
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1", "--model.allocation.enabled=true"))
    assert code == 0
    (line,) = [line for line in err.splitlines() if "fell back to uniform" in line]
    assert line.startswith("bit allocation fell back to uniform: start output MSE")
    assert {layer.config.codebook_size for layer in vq_layers(load_quantized(tmp_path / "packed")).values()} == {16}


def test_the_student_reuses_the_probe_layers_kmeans_runs_once_per_option(monkeypatch):
    import vq4dit.assignment

    calls = []
    real = vq4dit.assignment.kmeans
    monkeypatch.setattr(vq4dit.assignment, "kmeans", lambda *a, **k: calls.append(a[1]) or real(*a, **k))
    teacher = load_dit("tiny")
    selected = select_layers(teacher, QUALITY)
    engine = Calibrator.build(teacher, QUALITY, items=tiny_items(), guidance_scale=4.0, bit_allocation=True,
                              progress=False, allocation_config=AllocationConfig(gain_items=8, check_items=8))
    assert len(calls) == 3 * len(selected)  # k / 2, k, 2 k per layer; none again for the student
    assert set(engine.phase_seconds) >= {"statistics", "kmeans", "feedback", "probe", "check"}
    chosen = {name: layer.config.codebook_size for name, layer in engine.layers.items()}
    assert chosen == {name: fields["codebook_size"] for name, fields in engine.allocation.items()}
    calls.clear()
    Calibrator.build(load_dit("tiny"), QUALITY, items=tiny_items(), guidance_scale=4.0, progress=False)
    assert len(calls) == len(selected)  # uniform: once per layer


def test_allocation_is_not_worse_than_uniform_at_equal_bits_on_the_reference():
    from vq4dit.reference import load_reference_model
    from vq4dit.sampling import SamplerConfig
    from vq4dit.trajectories import TrajectoryPlan, generate_items

    teacher = load_reference_model()
    sampler = SamplerConfig(sampler="ddpm", num_steps=8, guidance_scale=4.0)
    items = generate_items(teacher, [0, 1], TrajectoryPlan(0, 4, 10, sampler), progress=False)
    config = AllocationConfig(gain_items=16, check_items=16)
    held_out = strided_items(items["t"].numel(), 32)[1::2]  # the check's items (not the gain's)
    batches = item_batches(items, held_out, 4.0, batch_size=32)
    _, reference = output_mse(teacher, batches)
    allocated = Calibrator.build(teacher, QUALITY, items=items, guidance_scale=4.0, bit_allocation=True, progress=False,
                                 allocation_config=config)
    uniform = Calibrator.build(teacher, QUALITY, items=items, guidance_scale=4.0, progress=False)
    check = allocated.allocation_check
    # the check measured the starts the two runs really begin from
    assert check["uniform_mse"] == pytest.approx(output_mse(uniform.student, batches, reference)[0], rel=1e-5)
    start = output_mse(allocated.student, batches, reference)[0]
    assert start <= check["uniform_mse"] * (1 + 1e-5)  # kept and better, or fell back to uniform
    assert start == pytest.approx(check["allocated_mse"] if check["kept"] else check["uniform_mse"], rel=1e-5)
    bits = lambda engine: mean_bits_per_weight([(n, l, l.config) for n, l in engine.layers.items()])  # noqa: E731
    assert bits(allocated) <= bits(uniform) + 1e-9
