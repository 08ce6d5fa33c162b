"""CandidatePruning: decides when soft rows harden, candidates are pruned and layers finalise."""

from __future__ import annotations

import pytorch_lightning as pl

from .settings import check_range


class CandidatePruning(pl.Callback):
    """Harden confident rows, prune weak candidates, finalise nearly-hard layers.

    Runs after the optimiser step every ``every_n_steps`` steps. Rows (sub-vectors) whose top
    ratio exceeds ``harden_threshold`` take that candidate for good; candidates whose ratio fell
    below ``prune_floor`` leave the candidate set; a layer with at least ``finalize_fraction`` hard
    rows takes the argmax for all rows (official code: 0.99 / 0.99). The optimiser state of the
    shrunk ratio logits shrinks with them. With the module's ``spread_blocks`` each rank acts on
    the layers of its own blocks; the logged counts are global.

    Args:
        every_n_steps: how often to act.
        harden_threshold: top ratio above which a row hardens, in (0.5, 1].
        prune_floor: ratio below which a candidate is removed, in [0, 0.5); 0 disables pruning.
        finalize_fraction: hard fraction at which a whole layer is finalised, in (0, 1].
        histogram_every_n_steps: ratio histograms to TensorBoard (0 disables).
    """

    def __init__(
        self,
        every_n_steps: int = 1,
        harden_threshold: float = 0.99,
        prune_floor: float = 0.01,
        finalize_fraction: float = 0.99,
        histogram_every_n_steps: int = 200,
    ) -> None:
        check_range("CandidatePruning", "every_n_steps", every_n_steps, 1)
        check_range("CandidatePruning", "harden_threshold", harden_threshold, 0.5, 1.0, low_open=True)
        check_range("CandidatePruning", "prune_floor", prune_floor, 0.0, 0.5, high_open=True)
        check_range("CandidatePruning", "finalize_fraction", finalize_fraction, 0.0, 1.0, low_open=True)
        check_range("CandidatePruning", "histogram_every_n_steps", histogram_every_n_steps, 0)
        self.every_n_steps = every_n_steps
        self.harden_threshold = harden_threshold
        self.prune_floor = prune_floor
        self.finalize_fraction = finalize_fraction
        self.histogram_every_n_steps = histogram_every_n_steps

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps:
            return
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        pl_module.engine.prune_(optimizer, self.harden_threshold, self.prune_floor, self.finalize_fraction)
        self._log(trainer, pl_module)

    def _log(self, trainer: pl.Trainer, pl_module) -> None:
        # Collectives under spread_blocks: every rank takes the same branches (global values only).
        engine = pl_module.engine
        layers, counts = engine.layers, engine.soft_counts()  # name -> (soft rows, slots)
        total = sum(l.num_subvectors for l in layers.values())
        soft = sum(rows for rows, _ in counts.values())
        candidates = sum(slots for _, slots in counts.values())
        hard_layers = sum(rows == 0 for rows, _ in counts.values())
        pl_module.log_dict(
            {
                "calibration/hard_fraction": 1.0 - soft / max(total, 1),
                "calibration/hard_layers": float(hard_layers),
                "calibration/mean_candidates_per_soft_row": candidates / max(soft, 1),
            },
            on_step=True, on_epoch=False,
        )
        pl_module.log("hard", 1.0 - soft / max(total, 1), prog_bar=True, logger=False, on_step=True, on_epoch=False)
        step = trainer.global_step
        if trainer.logger is None or step % max(trainer.log_every_n_steps, 1):
            return
        metrics = {f"hard_fraction/{name}": 1.0 - counts[name][0] / max(l.num_subvectors, 1) for name, l in layers.items()}
        trainer.logger.log_metrics(metrics, step=step)
        if self.histogram_every_n_steps and step % self.histogram_every_n_steps == 0 and soft:
            top = engine.top_ratios_of_soft_rows()
            experiment = getattr(trainer.logger, "experiment", None)
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram("calibration/top_ratio_of_soft_rows", top, step)
