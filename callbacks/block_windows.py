"""BlockWindows: decides when block-by-block calibration moves on to its next window of blocks."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

from .settings import check_range


class BlockWindows(pl.Callback):
    """Move ``--model.calibration.window_blocks K`` calibration on, window by window (inactive without it).

    A window of K blocks ends once all its layers are hard and its codebooks trained alone for
    ``min_codebook_steps`` steps, or after ``max_steps`` steps in it (the budget: its remaining soft
    rows then take their argmax). The module acts (:meth:`CalibrationModule.advance_window_`: the
    window's layers harden and leave the optimizer, the next window's enter it); at the end of the
    last window the run stops. Plan ``trainer.max_epochs`` (and ``CalibrationStop.max_steps``) for
    ``ceil(L / K)`` windows.

    Args:
        max_steps: steps per window at most.
        min_codebook_steps: codebook-only steps once the window's layers are all hard.
    """

    def __init__(self, max_steps: int = 1000, min_codebook_steps: int = 50) -> None:
        check_range("BlockWindows", "max_steps", max_steps, 1)
        check_range("BlockWindows", "min_codebook_steps", min_codebook_steps, 0)
        self.max_steps, self.min_codebook_steps = max_steps, min_codebook_steps
        self.window_start = 0  # the global step the current window began at
        self.hard_since: int | None = None  # the step its layers were all hard at
        self._last_done = False  # this rule ended the last window

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        engine = getattr(pl_module, "engine", None)
        window = None if engine is None else engine.window
        if window is None or window.done:
            return
        step = trainer.global_step
        pl_module.log("calibration/window", float(window.index), on_step=True, on_epoch=False)
        if self.hard_since is None and all(layer.is_hard for layer in engine.owned_layers().values()):
            self.hard_since = step
        hard_long_enough = self.hard_since is not None and step - self.hard_since >= self.min_codebook_steps
        if not hard_long_enough and step - self.window_start < self.max_steps:
            return
        if window.is_last:
            trainer.should_stop = self._last_done = True  # the module's on_train_end ends the windows
            return
        done = window.describe()
        rows = pl_module.advance_window_()
        rank_zero_info(f"block windows: {done} finished at step {step} ({rows} soft rows took their argmax); "
                       f"now {window.describe()}")
        self.window_start, self.hard_since = step, None

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        window = getattr(getattr(pl_module, "engine", None), "window", None)
        if window is not None and not window.done and not self._last_done:
            rank_zero_warn(f"block-by-block calibration stopped in {window.describe()}: the later blocks were not "
                           "calibrated (their soft rows take the argmax of their start); raise trainer.max_epochs or "
                           "the step budget")

    def state_dict(self) -> dict:
        return {"window_start": self.window_start, "hard_since": self.hard_since}

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
