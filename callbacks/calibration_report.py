"""CalibrationReport: every calibration reports on itself (always on in ``train.py``)."""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from .settings import check_range


def judged_metric(values: dict[str, float]) -> str:
    """The error that decides: the output MSE; the block MSE where block inputs from the teacher give no output error (NaN)."""
    return "output_mse" if math.isfinite(values["output_mse"]) else "block_mse"


def spread_indices(count: int, picks: int) -> set[int]:
    """``picks`` of ``range(count)`` evenly spread from the first to the last (all when ``count <= picks``).

    The validation items are in sampling order (every trajectory's first step, then its second, ...):
    batches spread over the loader cover the whole trajectory, from pure noise to the clean image."""
    if count <= picks:
        return set(range(count))
    if picks == 1:
        return {0}
    return {round(i * (count - 1) / (picks - 1)) for i in range(picks)}


class CalibrationReport(pl.Callback):
    """Measure the validation error of the student against the FP teacher at the start of fit
    (before the first step: the k-means / error-feedback start), every ``every_n_steps`` steps
    (the checks) and at its end (after ``FinalAssignment`` made every layer hard, before it
    exports); print start and end, log them to the logger (``report/*``), and when the end's
    error is above the best measured (the start or a check), return the student to that state
    (``keep_best``: its argmax is exported, with one line saying so) or warn.

    Every measurement is of the student as it would be exported then (soft rows at their argmax).
    The module computes (:meth:`CalibrationModule.validation_error`); this callback only picks the
    moments and ``max_batches`` validation batches spread over the loader (the items are in sampling
    order: the batches cover the trajectory from its noisiest step to its last). A resumed run keeps the start (its
    validation error is part of the callback's checkpoint state, and the student as the resumed
    run builds it, before the checkpoint is loaded over it, is the start: the build is
    deterministic) and the best check (its VQ state is in the checkpoint).

    Args:
        max_batches: validation batches per measurement (the cost: 2 x this many forward passes
            of teacher and student).
        keep_best: keep a CPU copy of the student's VQ state at the best moment measured so far
            (the size of its ratio logits, codebooks and codes) and export it instead when
            calibration ended worse.
        every_n_steps: optimizer steps between checks (0: the start and the end only).
    """

    def __init__(self, max_batches: int = 4, keep_best: bool = True, every_n_steps: int = 0) -> None:
        check_range("CalibrationReport", "max_batches", max_batches, 1)
        check_range("CalibrationReport", "every_n_steps", every_n_steps, 0)
        self.max_batches, self.keep_best, self.every_n_steps = max_batches, keep_best, every_n_steps
        self.start: dict[str, float] | None = None
        self.end: dict[str, float] | None = None
        self.best: dict[str, float] | None = None  # the lowest error measured before the end
        self.best_step = 0  # when: 0 is the start
        self.kept_step: int | None = None  # the step whose state was exported instead of the end's
        self.kept: dict[str, float] | None = None  # its validation error, measured again once kept
        self._snapshot: dict | None = None  # the best state (CPU)
        self.checks: list[tuple[int, dict[str, float]]] = []  # (step, validation error) of every check
        self._checked_step = -1
        self._batches: list | None = None  # the measured validation batches (CPU)

    @property
    def kept_start(self) -> bool:
        """Whether the start was exported instead of the end."""
        return self.kept_step == 0

    def _measure(self, trainer: pl.Trainer, pl_module) -> dict[str, float] | None:
        if self._batches is None:  # picked once: the validation items do not change during a fit
            datamodule = getattr(trainer, "datamodule", None)
            loader = datamodule.val_dataloader() if datamodule is not None and hasattr(datamodule, "val_dataloader") else []
            picked = spread_indices(len(loader), self.max_batches)
            self._batches = [b for i, b in enumerate(loader) if i in picked]
        batches = [trainer.strategy.batch_to_device(b) for b in self._batches]
        if not batches or getattr(pl_module, "engine", None) is None:
            return None
        values = pl_module.validation_error(batches)
        if trainer.world_size > 1 and pl_module.engine.spread is None:  # each rank saw its own items
            values = {k: float(trainer.strategy.reduce(torch.tensor(v, device=pl_module.device), reduce_op="mean"))
                      for k, v in values.items()}
        return values

    def setup(self, trainer: pl.Trainer, pl_module, stage: str) -> None:
        self._batches = None  # this fit's validation items
        if stage == "fit" and self.keep_best:  # a resume: the module copies the student it builds
            pl_module.keep_built_start = True

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        built = getattr(pl_module, "built_start", None)
        pl_module.built_start = None
        if self.start is not None:  # resumed: the start of the first run, the best state from the checkpoint
            if self.keep_best and self.best_step == 0:
                self._snapshot = built
            return
        self.start = self._measure(trainer, pl_module)
        if self.start is None:
            rank_zero_info("calibration report: no validation items (data.val_trajectories=0), no report")
            return
        self.best, self.best_step = dict(self.start), 0
        if self.keep_best:
            self._snapshot = pl_module.engine.snapshot()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if not self.every_n_steps or self.best is None or step % self.every_n_steps or step == self._checked_step:
            return
        self._checked_step = step  # once per optimizer step (gradient accumulation repeats the step)
        values = self._measure(trainer, pl_module)
        if values is None:
            return
        self.checks.append((step, values))
        pl_module.log_dict({f"report/{k}_check": v for k, v in values.items()}, on_step=True, on_epoch=False)
        judged = judged_metric(self.best)
        if values[judged] < self.best[judged]:
            self.best, self.best_step = values, step
            if self.keep_best:  # under spread_blocks every rank takes this branch (the values are global)
                pl_module.engine.share_(trainer.optimizers[0] if trainer.optimizers else None, pl_module.device)
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
        best = self.best or self.start
        judged = judged_metric(self.start)
        worse = self.end[judged] / best[judged] if best[judged] > 0 else float("nan")
        if worse <= 1.0 or not math.isfinite(worse):  # equal: the best check was the end
            return
        moment = "its start" if self.best_step == 0 else f"its check at step {self.best_step}"
        if self._snapshot is not None:
            pl_module.engine.restore_(self._snapshot)
            self._snapshot, self.kept_step = None, self.best_step
            self.kept = kept = self._measure(trainer, pl_module)
            if trainer.logger is not None:
                trainer.logger.log_metrics({f"report/{k}_kept": v for k, v in kept.items()}, step=trainer.global_step)
            state = "the start" if self.best_step == 0 else f"the student of step {self.best_step}"
            rank_zero_info(
                f"calibration report: calibration ended worse than {moment} ({judged} {worse:.3f}x): {state} was kept "
                f"(validation output MSE {kept['output_mse']:.4g}, block MSE {kept['block_mse']:.4g}); it is the model exported"
            )
            return
        rank_zero_warn(
            f"calibration made the validation error worse than {moment} ({judged} {worse:.3f}x): "
            "check the recipe's levers (e.g. --model.recipe paper) and the step budget"
            + ("" if not self.keep_best else "; that state could not be kept (no copy of it)")
        )

    def state_dict(self) -> dict:
        state = {"start": self.start, "best": self.best, "best_step": self.best_step}
        if self.keep_best and self.best_step > 0 and self._snapshot is not None:
            state["best_snapshot"] = self._snapshot  # the start is built again on resume; a check is not
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.start = state_dict.get("start")
        self.best = state_dict.get("best", self.start)
        self.best_step = state_dict.get("best_step", 0)
        self._snapshot = state_dict.get("best_snapshot")
