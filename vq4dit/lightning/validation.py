"""One validation pass over the calibration module's settings, before any heavy work (no
trajectory, no k-means): every mistake knowable at start is a ``ValueError`` naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..evaluation import SHIPPED_REFERENCES
from ..engine.overrides import check_overrides, highest_bits_per_weight, refuse_allocated_fields
from ..quantize import select_layers


def check_writable_dir(path: str, what: str = "export_dir") -> None:
    """Raise ``ValueError`` if ``path`` cannot be created or written."""
    target = Path(path).expanduser().resolve()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"{what} {path!r} is not writable ({probe} is not a writable folder)")
    if target.exists() and not target.is_dir():
        raise ValueError(f"{what} {path!r} exists and is not a folder")


def is_packed_model(folder: Path) -> bool:
    """Whether ``folder`` holds a vq4dit packed model (its config names ``quant_method: vq4dit``)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and (config.get("quantization_config") or {}).get("quant_method") == "vq4dit"


def check_export_dir(path: str) -> None:
    """``export_dir`` must be writable and either absent, empty or an earlier packed model (which
    the export replaces): never a folder of other files that the export would delete."""
    check_writable_dir(path)
    target = Path(path).expanduser()
    if target.is_dir() and any(target.iterdir()) and not is_packed_model(target):
        raise ValueError(
            f"export_dir {path!r} holds files that are not a vq4dit packed model; "
            "choose an empty or new folder (the export replaces the folder)"
        )


def check_module_settings(module) -> None:
    """Validate a :class:`vq4dit.lightning.CalibrationModule`'s resolved settings against its teacher."""
    settings = module.settings
    calibration, layers, allocation = settings["calibration"], settings["layers"], settings["allocation"]
    if settings["spread_blocks"] and calibration.block_inputs != "teacher":
        raise ValueError(
            "spread_blocks needs calibration.block_inputs='teacher' (blocks are only independent when each "
            f"gets its FP input), got block_inputs={calibration.block_inputs!r}"
        )
    if calibration.window_blocks is not None and settings["spread_blocks"]:
        raise ValueError("calibration.window_blocks does not combine with spread_blocks (block-by-block calibration "
                         "runs in one process); use one of them")
    if settings["offload_blocks"] and calibration.window_blocks is None:
        raise ValueError("offload_blocks needs calibration.window_blocks (only blocks outside the window go to the CPU)")
    if calibration.lr_row_scale is not None and not module.vq_config.row_scale:
        raise ValueError("calibration.lr_row_scale needs vq.row_scale (this recipe has no row scales to train); "
                         "drop one of them")
    if calibration.window_inputs == "disk" and calibration.window_inputs_dir is not None:
        check_writable_dir(calibration.window_inputs_dir, "calibration.window_inputs_dir")
    if settings["export"].dir is not None:
        check_export_dir(settings["export"].dir)
    evaluation = module.evaluation
    if evaluation.features == "classifier" and evaluation.model_source not in SHIPPED_REFERENCES:
        raise ValueError(f"metrics_features=classifier needs a shipped reference model ({', '.join(SHIPPED_REFERENCES)}) "
                         f"with its own classifier, got model {evaluation.model_source!r}; use inception")
    quantized = settings["evaluation"].quantized
    if quantized is not None:
        if not is_packed_model(Path(quantized)):
            raise ValueError(f"quantized={quantized!r} is not a packed vq4dit model folder (no config.json with quant_method vq4dit)")
        return
    check_overrides(layers.overrides)
    selected = select_layers(module.teacher, settings["vq"], layers.linear_filter(module.teacher), include=layers.include,
                             exclude=layers.exclude, overrides=layers.overrides)
    if allocation.enabled:
        refuse_allocated_fields(layers.overrides, [name for name, _, _ in selected])
        from ..engine.allocation import cheapest_bits_per_weight

        floor = cheapest_bits_per_weight(selected, allocation.span)
        if allocation.budget is not None and allocation.budget < floor:
            raise ValueError(f"bit_budget {allocation.budget} is below the cheapest allocation of the selected layers "
                             f"({floor:.3f} bits/weight all-in)")
        ceiling = highest_bits_per_weight(selected)
        if allocation.budget is not None and allocation.budget > ceiling * (1 + 1e-9):
            raise ValueError(f"bit_budget {allocation.budget} cannot be reached: the allocation of the selected layers "
                             f"tops out at {ceiling:.3f} bits/weight all-in (k up to 4x the configured one); "
                             "lower the budget or raise codebook_size")
