"""FinalAssignment: at the end of fit, argmax every soft row, write the packed model."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

from vq4dit.export import save_quantized, size_report
from vq4dit.quantize import finalize_model_


class FinalAssignment(pl.Callback):
    """Make every layer hard (argmax of the ratios) and export the packed checkpoint.

    The export goes to the module's ``export_dir`` (skipped with a notice when it is unset); only
    global rank 0 writes. The size report is printed and logged.
    """

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
                path = save_quantized(pl_module.student, export_dir, overwrite=True)
                rank_zero_info(f"packed quantized model written to {path}")
            else:
                rank_zero_info("model.export_dir is not set: the packed model was not written")
        trainer.strategy.barrier()
