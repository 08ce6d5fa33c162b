"""Resuming a calibration: which checkpoint ``--ckpt_path last`` means, and whether a checkpoint
may be resumed with this run's settings (the one resume-compatibility check)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Mapping

import torch

from .settings import flatten, is_resumable

# Data settings that may differ between a checkpoint and the run resuming or evaluating it: where
# the cache lies and how the result is evaluated, never on which trajectories it is calibrated (the
# model settings that may differ are the groups of ``settings.RESUMABLE``).
RESUMABLE_DATA = {
    "cache_dir", "val_trajectories", "eval_samples", "eval_batch_size", "eval_seed", "eval_sampler",
    "eval_num_steps", "eval_guidance_scale",
}
_VERSION = re.compile(r"^version_(\d+)$")


def find_latest_checkpoint(folders: list[str | Path]) -> Path | None:
    """The most recently written ``*.ckpt`` under any of ``folders`` (recursively), or None."""
    found = [p for folder in folders if Path(folder).is_dir() for p in Path(folder).rglob("*.ckpt") if p.is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime_ns, p.name == "last.ckpt"), default=None)


def logger_version_of(checkpoint: Path) -> int | None:
    """N when ``checkpoint`` lies in a TensorBoard ``version_N`` folder (so a resume logs there)."""
    for parent in checkpoint.parents:
        match = _VERSION.match(parent.name)
        if match:
            return int(match.group(1))
    return None


def read_settings(path: str | Path) -> tuple[dict, dict]:
    """``(model settings, data settings)`` stored in a Lightning checkpoint (tensors never unpickled)."""
    try:
        checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as error:  # an unreadable or foreign file: one line instead of a traceback
        raise ValueError(f"cannot read checkpoint {path}: {error}") from error
    if not isinstance(checkpoint, dict) or "vq4dit" not in checkpoint:
        raise ValueError(f"{path} is not a vq4dit calibration checkpoint")
    return dict(checkpoint.get("hyper_parameters", {})), dict(checkpoint.get("datamodule_hyper_parameters", {}))


def resume_conflicts(saved: Mapping, asked: Mapping, resumable: Callable[[str], bool]) -> list[str]:
    """``"key: checkpoint X, this run Y"`` for every setting that differs and may not."""
    return [
        f"{key}: checkpoint {saved[key]!r}, this run {asked[key]!r}"
        for key in sorted(saved) if key in asked and not resumable(key) and asked[key] != saved[key]
    ]


def check_resumable(path: str | Path, model: Mapping, data: Mapping, resolve: Callable[[Mapping], Mapping]) -> None:
    """``ValueError`` naming every model or data setting of this run that differs from the
    checkpoint's (a resume must train the same configuration on the same trajectories). The model
    settings compared are the RESOLVED ones: ``resolve`` turns a ``model:`` section (this run's, or
    the checkpoint's record, also a former version's flat one) into the record of the resolved
    settings, so a flag equal to the recipe's value is no conflict."""
    saved_model, saved_data = read_settings(path)
    conflicts = resume_conflicts(flatten(resolve(saved_model)), flatten(resolve(model)), is_resumable)
    conflicts += [f"data.{c}" for c in resume_conflicts(saved_data, data, RESUMABLE_DATA.__contains__)]
    if conflicts:
        raise ValueError(f"cannot resume from {path}: it was calibrated with another configuration ({'; '.join(conflicts)})")


def read_allocation(path: str | Path) -> dict[str, dict[str, int]] | None:
    """The per-layer codebook sizes a calibration checkpoint was built with (None: uniform)."""
    checkpoint = torch.load(path, weights_only=True, map_location="cpu")
    return (checkpoint.get("vq4dit") or {}).get("allocation")
