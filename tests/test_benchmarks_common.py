"""benchmarks/common.py: bits/weight from ``size_report`` against the per-layer definition, the
machine line, timing and tables."""

import os
import time
from datetime import date

import torch

from benchmarks.common import Timer, bits_per_weight, fit_args, machine_line, markdown_table, timed
from vq4dit import VQConfig, finalize_model_, load_dit, quantize_
from vq4dit.quantize import vq_layers


def test_bits_per_weight_is_the_weighted_mean_of_the_layers():
    model = load_dit("tiny")
    # two codebook sizes, so an unweighted mean over layers would differ
    quantize_(model, VQConfig(codebook_size=16, subvector_dim=2, num_candidates=1, kmeans_iters=0, row_scale=True),
              overrides={"*.ff.*": {"codebook_size": 64}}, progress=False)
    finalize_model_(model)
    layers = list(vq_layers(model).values())
    weights = [l.in_features * l.out_features for l in layers]
    expected = sum(l.bits_per_weight(include_codebook=True) * w for l, w in zip(layers, weights)) / sum(weights)
    assert abs(bits_per_weight(model) - expected) < 1e-9
    assert len({l.config.codebook_size for l in layers}) == 2 and expected > 2.0  # codes + codebooks + scales


def test_machine_line_names_cores_threads_and_date():
    line = machine_line("extra bit", "", label="measured on")
    assert line.startswith("measured on: ") and f"{os.cpu_count()} cores" in line
    assert f"{torch.get_num_threads()} thread(s)" in line and date.today().isoformat() in line
    assert line.endswith(", extra bit")


def test_timer_and_timed():
    with Timer() as t:
        time.sleep(0.02)
    assert 0.02 <= t.seconds < 1.0
    calls = []
    seconds, result = timed(lambda: calls.append(1) or len(calls), repeats=3)
    assert result == 3 and len(calls) == 3 and 0 <= seconds < 1.0


def test_markdown_table_and_fit_args():
    table = markdown_table(["a", "b"], [[1, "x"], [2.5, "y"]]).splitlines()
    assert table == ["| a | b |", "|---|---|", "| 1 | x |", "| 2.5 | y |"]
    args = fit_args("/tmp/run", ["configs/demo.yaml", "extra.yaml"], "--model.vq.bits=3", logger=False)
    assert args[:4] == ["--config", "configs/demo.yaml", "--config", "extra.yaml"] and args[-1] == "--model.vq.bits=3"
    assert "--trainer.logger=false" in args and "--model.export.dir=/tmp/run/packed" in args


def test_recipe_configs_resolve_as_the_module_and_build_the_default_with_its_statistics():
    """benchmarks/recipe_configs.py: each recipe's settings are what ``CalibrationModule`` resolves
    from the command line, and the default's build gathers the statistics (full E[x x^T] for error
    feedback) from teacher forwards on random items; the paper's gathers none."""
    from benchmarks.recipe_configs import RECIPES, build_engine, full_moment_bytes, random_items, recipe_settings
    from vq4dit.lightning import CalibrationModule

    for recipe in RECIPES:
        module = CalibrationModule(model="tiny", recipe=recipe, vq={"bits": 3, "kmeans_iters": 1},
                                   calibration={"teacher_dtype": "bfloat16"})
        assert recipe_settings(recipe, 3, {"teacher_dtype": "bfloat16"}, kmeans_iters=1) == (
            module.vq_config, module.calibration), recipe
    teacher = load_dit("tiny")
    items = random_items(teacher, 3)
    assert items["x"].shape[0] == 6 and (items["y"][3:] == 1000).all()  # + null-label copies
    default = build_engine(teacher, "quality", 2, 2, kmeans_iters=0)
    assert {"statistics", "feedback"} <= set(default.phase_seconds)
    assert full_moment_bytes(default) == sum(l.in_features ** 2 * 4 for l in default.layers.values())
    assert all(l.row_scales is not None for l in default.layers.values())
    paper = build_engine(load_dit("tiny"), "paper", 2, 2, kmeans_iters=0)
    assert "statistics" not in paper.phase_seconds and full_moment_bytes(paper) == 0


def test_recipe_rule_verdict_and_summary_use_the_default_seed_spread():
    from benchmarks.recipe_rule import summary_table, verdict

    run = lambda recipe, fid, seed=0, setting="w3": {  # noqa: E731
        "model": "m", "setting": setting, "recipe": recipe, "seed": seed, "bits_per_weight": 3.2, "fid": fid,
        "class_accuracy": 0.9, "mse_to_fp": 0.01, "steps": 100, "calibration_s": 10.0}
    results = [run("fp", 10.0, setting="fp"), run("fp@1", 11.0, 1, "fp"), run("default", 11.0), run("default", 12.0, 1),
               run("paper", 14.0), run("no-aware", 11.2), run("no-feedback", 9.0)]
    line = verdict(results)
    assert line.startswith("- m w3, FID/FP: default 1.150 (noise bar +-0.100, 2 seeds)")
    assert "paper 1.400 (worse)" in line and "no-aware 1.120 (within noise)" in line and "no-feedback 0.900 (better)" in line
    assert "no-aware 0.0100 (within noise)" in verdict(results, "mse_to_fp")
    table = summary_table(results)
    assert "| m | w3 | default | 2 | 3.20 | 1.15 (1.10-1.20) |" in table and "| m | fp | fp vs fp | 1 | 32 | 1.10 |" in table
