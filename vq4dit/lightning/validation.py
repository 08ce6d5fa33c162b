"""One validation pass over the calibration module's settings, before any heavy work (no
trajectory, no k-means): every mistake knowable at start is a ``ValueError`` naming it."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
    """Validate a :class:`vq4dit.lightning.CalibrationModule`'s settings against its teacher."""
    hp = module.hparams
    if hp.spread_blocks and hp.block_inputs != "teacher":
        raise ValueError(
            "spread_blocks needs block_inputs='teacher' (blocks are only independent when each "
            f"gets its FP input), got block_inputs={hp.block_inputs!r}"
        )
    if hp.export_dir is not None:
        check_export_dir(hp.export_dir)
    if hp.quantized is not None:
        if not is_packed_model(Path(hp.quantized)):
            raise ValueError(f"quantized={hp.quantized!r} is not a packed vq4dit model folder (no config.json with quant_method vq4dit)")
        return
    selected = select_layers(module.teacher, module.vq_config, include=hp.include, exclude=hp.exclude, overrides=hp.overrides)
    if hp.bit_budget is not None:
        if not module.bit_allocation:
            raise ValueError("bit_budget needs bit_allocation (it was turned off explicitly)")
        if not isinstance(hp.bit_budget, (int, float)) or not hp.bit_budget > 0:
            raise ValueError(f"bit_budget must be a positive number of bits per weight, got {hp.bit_budget!r}")
    if module.bit_allocation:
        from ..engine.allocation import cheapest_bits_per_weight

        floor = cheapest_bits_per_weight(selected, module.allocation_config.span)
        if hp.bit_budget is not None and hp.bit_budget < floor:
            raise ValueError(f"bit_budget {hp.bit_budget} is below the cheapest allocation of the selected layers "
                             f"({floor:.3f} bits/weight all-in)")
