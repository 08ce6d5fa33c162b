"""User input checked for content before heavy work (issue 20): per-layer overrides merged with a
bit allocation field by field, override dicts with unknown or ill-typed fields, unreachable bit
budgets, non-finite numbers on the command line, model folders and data files that lie."""


import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.test_calibration import fit_args
from tests.test_trust import error_lines, run_main
from vq4dit import VQConfig, load_dit
from vq4dit.engine import Calibrator
from vq4dit.convert import DiTLoadError
from vq4dit.evaluation import load_real_images
from vq4dit.sampling import SamplerConfig
from vq4dit.trajectories import TrajectoryPlan, cached_items
from vq4dit.engine.overrides import check_overrides, merge_overrides, refuse_allocated_fields

LAYER = "transformer_blocks.1.ff.net.2"


def layer_settings(engine, name: str) -> tuple[int, int]:
    config = engine.student.get_submodule(name).config
    return config.codebook_size, config.subvector_dim


@pytest.mark.parametrize("pattern", [LAYER, "*.ff.net.2"])
def test_allocation_keeps_the_users_other_fields_of_a_layer(pattern):
    """A resumed allocation (k per exact layer name) and the user's d=2 for the same layer: both."""
    torch.manual_seed(0)
    teacher = load_dit("tiny")
    engine = Calibrator.build(teacher, VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=2),
                              include=["transformer_blocks.1.ff.*"], overrides={pattern: {"subvector_dim": 2}},
                              allocation={LAYER: {"codebook_size": 8}, "transformer_blocks.1.ff.net.0.proj": {"codebook_size": 32}},
                              progress=False)
    assert layer_settings(engine, LAYER) == (8, 2)
    assert layer_settings(engine, "transformer_blocks.1.ff.net.0.proj") == (32, 4)


def test_merge_overrides_is_field_by_field():
    merged = merge_overrides({LAYER: {"subvector_dim": 2, "num_candidates": 1}, "*.to_q": {"subvector_dim": 1}},
                             {LAYER: {"codebook_size": 8}, "a.to_q": {"codebook_size": 4}})
    assert merged == {LAYER: {"subvector_dim": 2, "num_candidates": 1, "codebook_size": 8},
                      "*.to_q": {"subvector_dim": 1}, "a.to_q": {"codebook_size": 4}}
    assert list(merged) == [LAYER, "*.to_q", "a.to_q"]  # the allocation's exact names after the user's patterns


@pytest.mark.parametrize("pattern", [LAYER, "*.net.2", "transformer_blocks.[01].ff.net.2"])
def test_a_users_codebook_size_under_bit_allocation_is_refused_in_one_line(pattern):
    with pytest.raises(ValueError, match=r"sets codebook_size of transformer_blocks\.\d\.ff\.net\.2, which bit allocation chooses"):
        refuse_allocated_fields({pattern: {"codebook_size": 64, "subvector_dim": 2}}, ["a.to_q", LAYER])
    refuse_allocated_fields({pattern: {"subvector_dim": 2}}, ["a.to_q", LAYER])  # other fields are fine
    refuse_allocated_fields({"nothing.*": {"codebook_size": 64}}, [LAYER])  # not a selected layer


@pytest.mark.parametrize("overrides, message", [
    ({"*.ff.*": {"subvector": 2}}, "unknown field 'subvector'"),
    ({"*.ff.*": {"subvector_dim": "2"}}, r"subvector_dim='2' must be int"),
    ({"*.ff.*": {"row_scale": 1}}, "row_scale=1 must be bool"),
    ({"*.ff.*": {"ratio_init": "bogus"}}, "ratio_init='bogus' must be 'inverse_distance' or 'uniform' or 'confident'"),
    ({"*.ff.*": 4}, "must map a layer name pattern to a dict"),
])
def test_override_dicts_are_checked_for_content(overrides, message):
    with pytest.raises(ValueError, match=message) as info:
        check_overrides(overrides)
    assert "\n" not in str(info.value) and "*.ff.*" in str(info.value)


@pytest.mark.parametrize("flag, message", [
    ("--model.allocation.budget=100", "cannot be reached: the allocation of the selected layers tops out at"),
    ('--model.layers.overrides={"transformer_blocks.1.ff.net.2": {"codebook_size": 8}}', "which bit allocation chooses"),
    ('--model.layers.overrides={"*.ff.net.2": {"subvectors": 2}}', "unknown field 'subvectors'"),
    ("--model.calibration.lr_codebook=nan", "--model.calibration.lr_codebook: nan is not a finite number"),
    ("--model.calibration.lr_bias=-inf", "--model.calibration.lr_bias: -inf is not a finite number"),
])
def test_command_line_mistakes_are_one_line_before_any_work(tmp_path, monkeypatch, capsys, flag, message):
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.allocation.enabled=true", flag))
    assert code == 2 and "Traceback" not in err and "usage:" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert message in line, line
    assert len(err.strip().splitlines()) <= 3, err  # no usage dump
    assert not list(tmp_path.rglob("version_*")) and not (tmp_path / "packed").exists()


@pytest.mark.parametrize("change, message", [
    ({"num_layers": 3}, "tensors the config describes are not in the weights (e.g. transformer_blocks.2."),
    ({"num_layers": 1}, "tensors in the weights are not in the config (e.g. transformer_blocks.1."),
    ({"attention_head_dim": 16, "num_attention_heads": 8}, "config.json and the weights disagree: size mismatch for"),
])
def test_a_model_folder_whose_config_and_weights_disagree_is_refused(tmp_path, change, message):
    load_dit("tiny").save_pretrained(tmp_path / "dit")
    config = json.loads((tmp_path / "dit" / "config.json").read_text())
    (tmp_path / "dit" / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(DiTLoadError) as info:  # diffusers alone loads the first with a random block 3
        load_dit(tmp_path / "dit")
    assert message in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize("damage", ["too_few_items", "nan", "labels_only"])
def test_a_trajectory_cache_with_wrong_content_is_generated_again(tmp_path, caplog, damage):
    teacher, plan = load_dit("tiny"), TrajectoryPlan(0, 2, 10, SamplerConfig(num_steps=3, guidance_scale=1.0))
    first = cached_items(teacher, [0], plan, str(tmp_path), progress=False)
    (path,) = tmp_path.glob("trajectories-*.safetensors")
    cached_items(teacher, [0], plan, str(tmp_path), progress=False)
    assert "generating the trajectories again" not in caplog.text  # a sound cache file is read as it is
    bad = {"too_few_items": {k: v[:2].contiguous() for k, v in first.items()},
           "nan": {**first, "x": torch.full_like(first["x"], float("nan"))},
           "labels_only": {"y": first["y"]}}[damage]
    save_file(bad, str(path))
    again = cached_items(teacher, [0], plan, str(tmp_path), progress=False)
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert "generating the trajectories again" in caplog.text and path.name in caplog.text
    assert set(load_file(str(path))) == {"x", "t", "y"} and load_file(str(path))["x"].shape == first["x"].shape


@pytest.mark.parametrize("content, message", [
    (lambda p: np.savez(p, arr_0=np.zeros((1, 8, 8, 3), np.uint8)), r"holds 1 image\(s\)"),
    (lambda p: p.write_bytes(b"PK\x03\x04 not a zip"), "cannot read arr_0"),
])
def test_real_images_with_too_little_or_malformed_content_is_one_line(tmp_path, content, message):
    path = tmp_path / "real.npz"
    content(path)
    with pytest.raises(ValueError, match=message) as info:
        load_real_images(str(path))
    assert "\n" not in str(info.value)
