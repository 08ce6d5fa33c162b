"""One typed settings object from the command line to the engine (issue 19 item 1; issue 20 item 8):
every setting is one dataclass field, the recipe fills what a user left unset, the resume check and
the model card read the resolved object, and the former flat flags still work."""

import dataclasses
import inspect
from types import SimpleNamespace
from typing import get_args

import pytest
import torch

import train
from callbacks.final_assignment import calibration_card
from tests.test_calibration import fit_args
from tests.test_trust import error_lines, run_main
from vq4dit import VQConfig, load_dit
from vq4dit.engine import Calibrator
from vq4dit.engine.config import BitAllocation, CalibrationConfig
from vq4dit.lightning import CalibrationModule
from vq4dit.lightning.resume import check_resumable
from vq4dit.lightning.settings import LEGACY_NAMES, RESUMABLE, flatten, is_resumable, resolved_record
from vq4dit.quantize import select_layers
from vq4dit.recipes import Recipe, apply_recipe
from vq4dit.typed_settings import recipe_fields, unresolved, unset

INIT = CalibrationModule.__init__
GROUPS = {name: p.default for name, p in inspect.signature(INIT).parameters.items()
          if dataclasses.is_dataclass(p.default)}
RESOLVE = dict(resolve=lambda section: resolved_record(INIT, section))


def test_the_settings_are_nested_typed_groups():
    assert set(GROUPS) == {"vq", "calibration", "allocation", "layers", "export", "evaluation"}
    for group in GROUPS.values():
        assert type(group).__dataclass_params__.frozen
        with pytest.raises(TypeError):  # keyword-only: swapping two floats cannot go unnoticed
            type(group)(*[f.default for f in dataclasses.fields(group)][:2])


@pytest.mark.parametrize("recipe", get_args(Recipe))
def test_every_recipe_decides_every_recipe_field(recipe):
    vq, calibration, allocation = apply_recipe(recipe, vq=unset(VQConfig), calibration=unset(CalibrationConfig),
                                               allocation=unset(BitAllocation))
    assert recipe_fields(VQConfig) and recipe_fields(CalibrationConfig) and recipe_fields(BitAllocation)
    assert unresolved(vq) == unresolved(calibration) == unresolved(allocation) == []
    # an explicit value always wins over the recipe
    explicit = apply_recipe(recipe, vq=dataclasses.replace(unset(VQConfig), row_scale=recipe == "paper"),
                            calibration=unset(CalibrationConfig), allocation=unset(BitAllocation))[0]
    assert explicit.row_scale is (recipe == "paper")


def test_the_engine_refuses_settings_left_to_a_recipe():
    teacher = load_dit("tiny")
    with pytest.raises(ValueError, match=r"row_scale.*apply a recipe"):
        select_layers(teacher, dataclasses.replace(unset(VQConfig), codebook_size=16, subvector_dim=2))
    with pytest.raises(ValueError, match="output_weight"):
        Calibrator(teacher, teacher, unset(CalibrationConfig))


def test_a_budget_implies_allocation_in_the_config():
    assert BitAllocation(enabled=None, budget=2.5).enabled is True
    assert BitAllocation(enabled=None).enabled is None  # the recipe decides
    with pytest.raises(ValueError, match="bit_budget needs bit_allocation"):
        BitAllocation(enabled=False, budget=2.5)
    for bad in (0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="positive number"):
            BitAllocation(budget=bad)
    paper = resolved_record(INIT, {"recipe": "paper", "allocation": {"budget": 2.5}})
    assert paper["allocation"] == {"enabled": True, "budget": 2.5, "span": 1, "gain_items": 16, "check_items": 32,
                                   "probe_kmeans_iters": None, "probe_points_per_codeword": 256}  # over the paper recipe's "no allocation"


def test_fit_help_shows_every_field_with_its_doc_and_choices(capsys):
    with pytest.raises(SystemExit):
        train.cli_main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps long lines
    for group_name, group in GROUPS.items():
        docs = inspect.getdoc(type(group))
        for field in dataclasses.fields(group):
            assert f"--model.{group_name}.{field.name} " in text, (group_name, field.name)
            doc = docs.split(f"{field.name}: ", 1)[1].split("\n")[0].strip()
            assert doc[:30] in text, (group_name, field.name, doc[:30])
    for flag in ("--model.vq.row_scale {true,false,null}", "--model.calibration.optimizer {rmsprop,adam}",
                 "--model.evaluation.model {quantized,fp}", "--model.recipe {quality,paper}"):
        assert flag in text, flag
    assert "Literal['inverse_distance', 'uniform', 'confident']" in text  # choices of an optional Literal


def test_every_former_flag_has_a_place_and_one_notice(capsys):
    fields = {f"{group}.{f.name}" for group, default in GROUPS.items() for f in dataclasses.fields(default)}
    assert set(LEGACY_NAMES.values()) <= fields
    assert RESUMABLE <= set(inspect.signature(INIT).parameters)
    args = train.translate_legacy(["fit", "--model.bits", "3", "--model.bit_budget=2.5", "--model.recipe=paper",
                                   "--model.vq.num_candidates=3"])
    assert args == ["fit", "--model.vq.bits", "3", "--model.allocation.budget=2.5", "--model.recipe=paper",
                    "--model.vq.num_candidates=3"]
    notes = capsys.readouterr().err.splitlines()
    assert notes == ["note: --model.bits is now --model.vq.bits", "note: --model.bit_budget is now --model.allocation.budget"]


def test_a_former_config_file_gives_the_same_settings(tmp_path, capsys):
    former = tmp_path / "former.yaml"
    former.write_text("model:\n  bits: 3\n  lr_bias: 0.001\n  export_dir: out\n  quantized: null\n  vq: {num_candidates: 3}\n")
    new = tmp_path / "new.yaml"
    new.write_text("model:\n  vq: {bits: 3, num_candidates: 3}\n  calibration: {lr_bias: 0.001}\n  export: {dir: out}\n")
    assert train.effective_config(former) == train.effective_config(new)
    assert "note: model.lr_bias in " in capsys.readouterr().err


def test_resume_compares_resolved_settings(tmp_path):
    saved = tmp_path / "saved.ckpt"
    torch.save({"vq4dit": {}, "hyper_parameters": resolved_record(INIT, {"vq": {"bits": 2}}),
                "datamodule_hyper_parameters": {"seed": 0}}, saved)
    # the recipe's own values, given explicitly, the former way or the new one: the same run
    for asked in ({"error_feedback": True}, {"vq": {"error_feedback": True}}, {"vq": {"row_scale": True}},
                  {"export": {"dir": "elsewhere"}, "evaluation": {"model": "fp"}, "spread_blocks": True}):
        check_resumable(saved, asked, {"seed": 0}, **RESOLVE)
    with pytest.raises(ValueError, match=r"allocation.enabled: checkpoint False, this run True"):
        check_resumable(saved, {"bit_allocation": True}, {"seed": 0}, **RESOLVE)
    with pytest.raises(ValueError, match=r"vq.codebook_size: checkpoint 256, this run 64.*data.seed"):
        check_resumable(saved, {"vq": {"bits": 3}}, {"seed": 1}, **RESOLVE)
    # a checkpoint of a former version (flat, unresolved hyperparameters) is compared resolved too
    former = tmp_path / "former.ckpt"
    torch.save({"vq4dit": {}, "hyper_parameters": {"model": "tiny", "bits": 2, "bit_allocation": None, "row_scale": None},
                "datamodule_hyper_parameters": {}}, former)
    check_resumable(former, {"vq": {"row_scale": True}}, {}, **RESOLVE)


def test_resuming_with_the_recipes_own_flag_is_accepted(tmp_path, monkeypatch, capsys):
    """Issue 20 item 8: a flag that says what the recipe decides (``--model.error_feedback true``, the
    quality recipe's; the issue's case was bit allocation, then the recipe's default) resumes."""
    assert run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=1"))[0] == 0
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last",
                                                       "--model.error_feedback=true"))
    assert code == 0 and not error_lines(err), err
    assert "note: --model.error_feedback is now --model.vq.error_feedback" in err


def test_the_card_shows_every_resolved_setting_that_decides_the_calibration():
    hparams = resolved_record(INIT, {"model": "reference", "vq": {"bits": 3}, "export": {"dir": "x"}})
    trainer = SimpleNamespace(global_step=7, datamodule=SimpleNamespace(hparams={"seed": 3, "cache_dir": "c", "_instantiator": "x"}))
    card = calibration_card(trainer, SimpleNamespace(hparams=hparams), started=None)
    expected = {key: value for key, value in flatten(hparams).items()
                if key != "model" and not is_resumable(key) and value is not None}
    assert {key: card[key] for key in expected} == expected  # an added setting appears without any other edit
    assert not any(key.startswith(("export.", "evaluation.", "data._")) for key in card) and "data.cache_dir" not in card
    assert (card["base_model"], card["num_candidates"], card["data.seed"], card["vq.row_scale"]) == ("reference", 2, 3, True)


def test_the_settings_page_lists_every_field_and_former_flag():
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "settings.md").read_text()
    former = dict(re.findall(r"^\| `--model\.(\w+)` \| `--model\.([\w.]+)` \|$", text, flags=re.MULTILINE))
    assert former == LEGACY_NAMES
    for name, group in GROUPS.items():
        (row,) = re.findall(rf"^\| `{name}` \|.*\| (.*) \|$", text, flags=re.MULTILINE)
        assert [f.replace("\\*", "") for f in row.split(", ")] == [f.name for f in dataclasses.fields(group)], name
