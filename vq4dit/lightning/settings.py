"""The ``--model.*`` settings as one typed, nested object: the groups the adapter adds to the
engine's (:class:`ExportSettings`; :class:`~vq4dit.lightning.evaluation.EvaluationSettings`), the
recipe resolution of a whole argument set, its plain record (what checkpoints, the resume check and
the model card read), and the former flat names of the settings (``LEGACY_NAMES``).

Every setting is one dataclass field (type, default, doc, choices): a record is ``asdict`` of the
resolved groups, never a list of names, so an added or renamed setting is recorded, compared on
resume and shown in the model card without any other edit.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from ..recipes import apply_recipe


@dataclass(frozen=True, kw_only=True)
class ExportSettings:
    """Where the calibrated model goes.

    Args:
        dir: the folder ``FinalAssignment`` writes the packed model to at the end of ``fit``
            (checked before any work; None: not written).
    """

    dir: str | None = None


# Top-level settings (or whole groups) that may differ between a checkpoint and the run resuming
# or evaluating it: where the result goes and how it is evaluated, never what is calibrated. The
# model card shows every other setting. tests/test_settings.py checks that each is a parameter.
RESUMABLE = frozenset({"export", "evaluation", "spread_blocks", "offload_blocks"})

# The flat ``--model.X`` names of vq4dit <= 715203d -> their place in the nested settings
# (train.py translates them on the command line and in --config files, with one notice each).
LEGACY_NAMES = {
    **{name: f"vq.{name}" for name in (
        "bits", "codebook_size", "subvector_dim", "num_candidates", "ratio_init", "kmeans_iters", "row_scale",
        "kmeans_metric", "error_feedback")},
    **{name: f"calibration.{name}" for name in (
        "block_inputs", "regularizer", "regularizer_weight", "regularizer_gating", "gate_window", "codebook_training",
        "optimizer", "lr_codebook", "lr_bias", "lr_logits", "teacher_dtype", "output_weight")},
    **{name: f"layers.{name}" for name in ("include", "exclude", "overrides")},
    "bit_allocation": "allocation.enabled",
    "bit_budget": "allocation.budget",
    "export_dir": "export.dir",
    "quantized": "evaluation.quantized",
    "eval_model": "evaluation.model",
    **{name: f"evaluation.{name}" for name in ("vae", "metrics_features", "real_images")},
}


def typed_arguments(init: Callable, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """All of ``init``'s keyword arguments: ``arguments`` over the parameter defaults, a dict given
    for a dataclass-typed parameter (a group) setting only its fields over the group's default (as
    on the command line: the fields left out stay for the recipe to decide)."""
    parameters = inspect.signature(init).parameters
    typed = {name: p.default for name, p in parameters.items() if p.default is not p.empty}
    for name, value in arguments.items():
        if name not in parameters:
            raise TypeError(f"unknown setting {name!r}")
        default = typed.get(name)
        if isinstance(value, Mapping) and dataclasses.is_dataclass(default):
            value = dataclasses.replace(default, **value)
        typed[name] = value
    return typed


def resolve(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The module's arguments with the recipe applied: every recipe field of ``vq``, ``calibration``
    and ``allocation`` left None gets the recipe's value (:func:`vq4dit.recipes.apply_recipe`)."""
    resolved = dict(arguments)
    resolved["vq"], resolved["calibration"], resolved["allocation"] = apply_recipe(
        arguments["recipe"], vq=arguments["vq"], calibration=arguments["calibration"], allocation=arguments["allocation"])
    return resolved


def record(arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Plain nested dict of ``arguments`` (each dataclass as ``dataclasses.asdict``): what a
    checkpoint stores as hyperparameters (loadable with ``torch.load(weights_only=True)``)."""
    return {name: dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
            for name, value in arguments.items()}


def flatten(settings: Mapping[str, Any]) -> dict[str, Any]:
    """``{"vq.bits": 2, ...}``: one dotted key per setting of a record (top-level settings keep
    their name; a group's fields are ``group.field``)."""
    flat: dict[str, Any] = {}
    for name, value in settings.items():
        if isinstance(value, Mapping):
            flat.update({f"{name}.{field}": item for field, item in value.items()})
        else:
            flat[name] = value
    return flat


def is_resumable(key: str) -> bool:
    """Whether the dotted setting ``key`` may differ on resume (it lies in a ``RESUMABLE`` group)."""
    return key.split(".", 1)[0] in RESUMABLE


def nest_legacy(section: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """A ``model:`` section with its former flat names (``bits``) moved to their groups
    (``vq: {bits: ...}``), and the ``(old, new)`` names moved. Groups already present are kept and
    merged into (a name given both ways keeps the nested value)."""
    nested: dict[str, Any] = {}
    moved = []
    for name, value in section.items():
        if name in LEGACY_NAMES:
            continue
        nested[name] = dict(value) if isinstance(value, Mapping) else value
    for name, value in section.items():
        if name not in LEGACY_NAMES:
            continue
        group, field = LEGACY_NAMES[name].split(".")
        target = nested.setdefault(group, {})
        if not isinstance(target, dict):  # None or a path: the group given as a whole
            target = nested[group] = {}
        target.setdefault(field, value)
        moved.append((name, LEGACY_NAMES[name]))
    return nested, moved


def resolved_record(init: Callable, section: Mapping[str, Any]) -> dict[str, Any]:
    """The record of the resolved settings that a ``model:`` section (nested, or of a former
    version: flat) gives ``init``, without building the model: what the resume check compares."""
    nested, _ = nest_legacy(section)
    parameters = inspect.signature(init).parameters
    return record(resolve(typed_arguments(init, {k: v for k, v in nested.items() if k in parameters})))
