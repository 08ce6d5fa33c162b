"""CalibrationReport: every calibration reports on itself (always on in ``train.py``)."""

from __future__ import annotations

import itertools
import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from .settings import check_range


class CalibrationReport(pl.Callback):
    """Measure the validation error of the student against the FP teacher at the start of fit
    (before the first step: the k-means / error-feedback start) and at its end (after
    ``FinalAssignment`` made every layer hard, before it exports); print both, log them to the
    logger (``report/*``), and when the end's output error is above the start's, return the
    student to its start (``keep_start``: the argmax of the start is exported, with one line
    saying so) or warn.

    The module computes (:meth:`CalibrationModule.validation_error`); this callback only picks the
    moments and the first ``max_batches`` validation batches. The start survives a resume: its
    validation error is part of the callback's checkpoint state, and the student as the resumed
    run builds it (before the checkpoint is loaded over it; the build is deterministic) is the start kept.

    Args:
        max_batches: validation batches per measurement (the cost: 2 x this many forward passes
            of teacher and student).
        keep_start: keep a CPU copy of the student's VQ state at the start (the size of its
            ratio logits, codebooks and codes) and export it instead when calibration ended worse.
    """

    def __init__(self, max_batches: int = 4, keep_start: bool = True) -> None:
        check_range("CalibrationReport", "max_batches", max_batches, 1)
        self.max_batches = max_batches
        self.keep_start = keep_start
        self.start: dict[str, float] | None = None
        self.end: dict[str, float] | None = None
        self.kept_start = False
        self.kept: dict[str, float] | None = None  # the start's validation error, measured again once kept
        self._snapshot: dict | None = None

    def _measure(self, trainer: pl.Trainer, pl_module) -> dict[str, float] | None:
        datamodule = getattr(trainer, "datamodule", None)
        loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") else []
        batches = [trainer.strategy.batch_to_device(b) for b in itertools.islice(loader, self.max_batches)]
        if not batches or getattr(pl_module, "engine", None) is None:
            return None
        values = pl_module.validation_error(batches)
        if trainer.world_size > 1 and pl_module.engine.spread is None:  # each rank saw its own items
            values = {k: float(trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="mean"))
                      for k, v in values.items()}
        return values

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        if stage == "fit" and self.keep_start:  # a resume: the module copies the student it builds
            pl_module.keep_built_start = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        if self.start is not None and self.keep_start:  # resumed: the start the module built again
            self._snapshot = getattr(pl_module, "built_start", None)
            pl_module.built_start = None
        if self.start is None:  # a resumed run keeps the start of the first run
            self.start = self._measure(trainer, pl_module)
            if self.start is None:
                rank_zero_info("calibration report: no validation items (data.val_trajectories=0), no report")
            elif self.keep_start:
                self._snapshot = pl_module.engine.snapshot()

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        if self.start is None:
            return
        self.end = self._measure(trainer, pl_module)
        if self.end is None:
            return
        ratios = {k: self.end[k] / self.start[k] if self.start[k] > 0 else float("nan") for k in self.end}
        if trainer.logger is not None:
            metrics = {f"report/{k}_{when}": v for when, d in (("start", self.start), ("end", self.end))
                       for k, v in d.items()}
            metrics.update({f"report/{k}_vs_start": v for k, v in ratios.items()})
            trainer.logger.log_metrics(metrics, step=trainer.global_step)
        rank_zero_info(
            f"calibration report ({trainer.global_step} steps): validation output MSE "
            f"{self.start['output_mse']:.4g} -> {self.end['output_mse']:.4g} ({ratios['output_mse']:.3f}x the start), "
            f"block MSE {self.start['block_mse']:.4g} -> {self.end['block_mse']:.4g} ({ratios['block_mse']:.3f}x)"
        )
        # the output error decides; block inputs from the teacher give none (NaN): then the block error
        judged = "output_mse" if math.isfinite(ratios["output_mse"]) else "block_mse"
        if ratios[judged] < 1.0 or not math.isfinite(ratios[judged]):
            return
        if self._snapshot is not None:
            pl_module.engine.restore_(self._snapshot)
            self._snapshot, self.kept_start = None, True
            self.kept = kept = self._measure(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"report/{k}_kept": v for k, v in kept.items()}, step=trainer.global_step)
            rank_zero_info(
                f"calibration report: calibration ended worse than its start ({judged} {ratios[judged]:.3f}x): the start "
                f"was kept (validation output MSE {kept['output_mse']:.4g}, block MSE {kept['block_mse']:.4g}); "
                "it is the model exported"
            )
            return
        rank_zero_warn(
            f"calibration made the validation error worse than its start ({judged} {ratios[judged]:.3f}x): "
            "check the recipe's levers (e.g. --model.recipe paper) and the step budget"
            + ("" if not self.keep_start else "; the start could not be kept (no copy of it)")
        )

    def state_dict(self) -> dict:
        return {"start": self.start}

    def load_state_dict(self, state_dict: dict) -> None:
        self.start = state_dict.get("start")
