"""CalibrationStop: the default stop rule (all layers hard, then the loss on a plateau)."""

from __future__ import annotations

import math

import pytorch_lightning as pl

from .settings import check_range


class CalibrationStop(pl.Callback):
    """Stop once every layer is hard and the block loss stopped improving.

    After the last layer hardens, the codebooks train alone for at least ``min_codebook_steps``;
    the run stops when the smoothed block MSE has not improved by ``min_relative_improvement``
    over ``patience`` steps, or at ``max_steps`` optimisation steps (the budget). Prefer this
    budget to ``trainer.max_steps``: with ``trainer.max_steps`` set, pytorch-lightning 2.6 resumes
    an end-of-epoch checkpoint as if the next epoch had already run (it skips one epoch).

    Args:
        min_codebook_steps: codebook-only steps after all layers are hard.
        patience: steps without sufficient improvement before stopping.
        min_relative_improvement: relative improvement of the smoothed loss that resets patience.
        smoothing: exponential smoothing factor of the loss (0 = no smoothing).
        max_steps: step budget (None = no budget besides ``trainer.max_epochs``).
    """

    def __init__(
        self,
        min_codebook_steps: int = 50,
        patience: int = 50,
        min_relative_improvement: float = 0.01,
        smoothing: float = 0.9,
        max_steps: int | None = None,
    ) -> None:
        check_range("CalibrationStop", "min_codebook_steps", min_codebook_steps, 0)
        check_range("CalibrationStop", "patience", patience, 1)
        check_range("CalibrationStop", "min_relative_improvement", min_relative_improvement, 0.0, 1.0, high_open=True)
        check_range("CalibrationStop", "smoothing", smoothing, 0.0, 1.0, high_open=True)
        check_range("CalibrationStop", "max_steps", max_steps, 1, allow_none=True)
        self.max_steps = max_steps
        self.min_codebook_steps = min_codebook_steps
        self.patience = patience
        self.min_relative_improvement = min_relative_improvement
        self.smoothing = smoothing
        self.hard_since: int | None = None
        self.smoothed = math.nan
        self.best = math.inf
        self.best_step = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        loss = trainer.callback_metrics.get("train/block_mse")
        if loss is None:
            return
        value = float(loss)
        self.smoothed = value if math.isnan(self.smoothed) else self.smoothing * self.smoothed + (1 - self.smoothing) * value
        step = trainer.global_step
        if self.max_steps is not None and step >= self.max_steps:
            trainer.should_stop = True
            return
        # soft_counts: global under spread_blocks (a collective; every rank gets here alike)
        counts = pl_module.engine.soft_counts() if self.hard_since is None else {}
        if self.hard_since is None and counts and all(rows == 0 for rows, _ in counts.values()):
            self.hard_since = step
            self.best, self.best_step = self.smoothed, step
        if self.hard_since is None:
            return
        if self.smoothed < self.best * (1 - self.min_relative_improvement):
            self.best, self.best_step = self.smoothed, step
        if step - self.hard_since >= self.min_codebook_steps and step - self.best_step >= self.patience:
            trainer.should_stop = True

    def state_dict(self) -> dict:
        return {"hard_since": self.hard_since, "smoothed": self.smoothed, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
