"""RunGuard: what a calibration leaves behind when it does not finish (always on in ``train.py``)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException


class RunGuard(pl.Callback):
    """On SIGTERM (schedulers stop jobs with it) save a resumable ``last.ckpt``; on any failure
    before the first optimisation step (SIGTERM included) remove the TensorBoard version folder
    this run created, which holds nothing yet.

    The checkpoint's path and the step are attached to the exception (``checkpoint``, ``step``),
    so the command line can say how to resume.
    """

    def __init__(self) -> None:
        self._started = time.time() - 1.0  # files older than this run (a resumed run's logs) are kept

    def on_exception(self, trainer: pl.Trainer, pl_module, exception: BaseException) -> None:
        if isinstance(exception, SIGTERMException):
            self._save_on_sigterm(trainer, exception)
        if trainer.global_step == 0 and trainer.is_global_zero:
            self._remove_empty_log_dir(trainer)  # stopped before the first step: nothing to look at

    def _save_on_sigterm(self, trainer: pl.Trainer, exception: BaseException) -> None:
        exception.step = trainer.global_step
        exception.checkpoint = None
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return  # nothing calibrated yet: the same command starts again
        callback = trainer.checkpoint_callback
        folder = Path(callback.dirpath) if callback is not None and callback.dirpath else \
            Path(trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        path = folder / "last.ckpt"
        trainer.save_checkpoint(path, weights_only=False)  # a collective under DDP; rank 0 writes, atomically
        exception.checkpoint = path
        rank_zero_info(f"SIGTERM at step {trainer.global_step}: resumable checkpoint written to {path}")

    @staticmethod
    def _log_dir(trainer: pl.Trainer) -> Path | None:
        logger = trainer.logger
        return Path(logger.log_dir) if logger is not None and getattr(logger, "log_dir", None) else None

    def _remove_empty_log_dir(self, trainer: pl.Trainer) -> None:
        log_dir = self._log_dir(trainer)
        if log_dir is None or not log_dir.is_dir():
            return
        if any(p.suffix == ".ckpt" or p.stat().st_mtime < self._started for p in log_dir.rglob("*")):
            return  # a checkpoint, or logs of an earlier run in the same folder
        shutil.rmtree(log_dir, ignore_errors=True)
