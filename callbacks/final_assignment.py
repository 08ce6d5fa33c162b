"""FinalAssignment: at the end of fit, argmax every soft row, write the packed model."""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from vq4dit.export import save_quantized, size_report
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
                rank_zero_info("model.export_dir is not set: the packed model was not written")
        trainer.strategy.barrier()


_DATA_KEYS = ("num_trajectories", "classes_per_trajectory", "batch_size", "sampler", "num_steps", "guidance_scale", "seed")
_MODULE_KEYS = ("recipe", "bits", "kmeans_iters", "regularizer", "codebook_training", "optimizer",
                "lr_codebook", "lr_bias", "lr_logits", "block_inputs", "bit_budget")
_VQ_KEYS = ("ratio_init", "row_scale", "kmeans_metric", "error_feedback")  # as the recipe resolved them


def calibration_card(trainer: pl.Trainer, pl_module, started: float | None) -> dict:
    """Model card facts of a calibration run (``vq4dit.model_card``): base model, n, settings, time."""
    hp = dict(getattr(pl_module, "hparams", {}) or {})
    data = dict(getattr(getattr(trainer, "datamodule", None), "hparams", {}) or {})
    card = {"base_model": hp.get("model"), "num_candidates": getattr(getattr(pl_module, "vq_config", None), "num_candidates", None),
            "calibration_steps": trainer.global_step}
    card.update({key: hp[key] for key in _MODULE_KEYS if key in hp})
    vq_config = getattr(pl_module, "vq_config", None)
    card.update({key: getattr(vq_config, key) for key in _VQ_KEYS if hasattr(vq_config, key)})
    if getattr(pl_module, "bit_allocation", False):
        card["bit_allocation"] = True
    card.update({f"trajectory_{key}" if key in ("seed", "sampler") else key: data[key] for key in _DATA_KEYS if key in data})
    if started is not None:
        card["calibration_seconds"] = round(time.monotonic() - started, 1)
    return {key: value for key, value in card.items() if value is not None}
