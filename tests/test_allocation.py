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
from vq4dit.engine.allocation import (
    LayerChoice, allocate_bits, allocation_options, cheapest_bits_per_weight, measure_sensitivity, solve_allocation,
)
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
    budget = ["--model.allocation.budget=1.9", "--trainer.callbacks=[{class_path: callbacks.CandidatePruning}, "
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
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.allocation.budget=0.5"))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert "bit_budget 0.5 is below the cheapest allocation" in line
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.allocation.budget=2", "--model.allocation.enabled=false"))
    assert code == 2 and "bit_budget needs bit_allocation" in error_lines(err)[0]
