"""FinalAssignment: at the end of fit, argmax every soft row, write the packed model."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from vq4dit.export import save_quantized, size_report
from vq4dit.lightning.resume import RESUMABLE_DATA
from vq4dit.lightning.settings import flatten, is_resumable
from vq4dit.quantize import finalize_model_


class FinalAssignment(pl.Callback):
    """Make every layer hard (argmax of the ratios) and export the packed checkpoint.

    The export goes to the module's ``export_dir`` (skipped with a notice when it is unset); only
    global rank 0 writes, with a model card of the calibration settings and time
    (:func:`calibration_card`). The size report is printed and logged.
    """

    _started: float | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module) -> None:
        self._started = time.monotonic()

    def on_train_end(self, trainer: pl.Trainer, pl_module) -> None:
        # before on_fit_end, so callbacks sampling at fit end (SampleImages) see the final model
        finalize_model_(pl_module.student)

    def on_fit_end(self, trainer: pl.Trainer, pl_module) -> None:
        self.on_train_end(trainer, pl_module)  # idempotent: no soft rows left after the first call
        report = size_report(pl_module.student)
        if trainer.logger is not None:
            totals = report.to_dict().get("totals", {})
            scalars = {f"size/{k}": float(v) for k, v in totals.items() if isinstance(v, (int, float))}
            if scalars:
                trainer.logger.log_metrics(scalars, step=trainer.global_step)
        export_dir = pl_module.export_dir
        if trainer.is_global_zero:
            rank_zero_info(report.format())
            if export_dir:
                card = calibration_card(trainer, pl_module, self._started)
                path = save_quantized(pl_module.student, export_dir, overwrite=True, card=card)
                rank_zero_info(f"packed quantized model written to {path}")
            else:
                rank_zero_info("model.export.dir is not set: the packed model was not written")
        trainer.strategy.barrier()


def calibration_card(trainer: pl.Trainer, pl_module, started: float | None) -> dict:
    """Model card facts of a calibration run (``vq4dit.model_card``): base model, n, time, and
    every resolved setting that decides what is calibrated: the module's settings record
    (``vq.bits``, ``calibration.lr_bias``, ...) and the data module's (``data.seed``, ...), less
    where the result goes and how it is evaluated (the settings a resume may change)."""
    settings = flatten(dict(getattr(pl_module, "hparams", {}) or {}))
    data = dict(getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {})
    card = {"base_model": settings.pop("model", None), "num_candidates": settings.get("vq.num_candidates"),
            "calibration_steps": trainer.global_step}
    card.update({key: value for key, value in settings.items() if not is_resumable(key) and not key.startswith("_")})
    card.update({f"data.{key}": value for key, value in data.items()
                 if key not in RESUMABLE_DATA and not key.startswith("_")})  # _instantiator: LightningCLI's
    if started is not None:
        card["calibration_seconds"] = round(time.monotonic() - started, 1)
    return {key: value for key, value in card.items() if value is not None}
