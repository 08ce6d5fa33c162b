"""The calibration LightningModule: owns the ``--model.*`` settings, turns them into typed configs
once and calls :class:`vq4dit.engine.Calibrator` from its hooks; evaluation is delegated to
:class:`SampleEvaluation`, block spreading to :class:`vq4dit.distributed.BlockSpread`."""

from __future__ import annotations

import sys

import pytorch_lightning as pl
import torch
from torch import nn

from ..distributed import BlockSpread, ddp_ignored
from ..engine import CalibrationConfig, Calibrator, load_packed_student
from ..engine.config import BlockInputs, CodebookTraining, OptimizerName, Regularizer, TeacherDtype
from ..models import load_dit
from ..quantize import argmax_view
from ..recipes import Recipe, recipe_settings
from ..vq_config import KMeansMetric, RatioInit, VQConfig
from .data import DataSettings
from .evaluation import EvalModel, MetricsFeatures, SampleEvaluation
from .resume import read_allocation
from .validation import check_module_settings


class CalibrationModule(pl.LightningModule):
    """VQ4DiT calibration of a DiT: zero-data, block-wise, with soft candidate assignments.

    Args:
        model: ``reference``, a preset (``DiT-XL/2-256``), a diffusers folder or hub id, or an original DiT ``.pt``.
        bits: 2 or 3, the paper presets (k=256, d=4 / k=64, d=2); codebook_size / subvector_dim override them.
        codebook_size: explicit k (a power of two).
        subvector_dim: explicit d (must divide every quantized layer's input size).
        num_candidates: candidate codewords per sub-vector (n; 1 = plain VQ, codebook-only calibration).
        ratio_init: initial candidate ratios, ``inverse_distance`` (official), ``uniform`` or ``confident`` (0.9 on the
            nearest; default: the recipe's).
        kmeans_iters: Lloyd iterations of the codebook initialisation.
        recipe: ``quality`` (default: the levers measured better, see README) or ``paper`` (the paper's method).
        row_scale: an FP16 scale per output row, calibrated with the codebook (default: the recipe's).
        kmeans_metric: ``euclidean`` or ``activation`` (inputs weighted by E[x^2]; default: the recipe's).
        include: glob patterns of the Linear layers to quantize (default: the 7 core Linears per block).
        exclude: glob patterns of Linear layers left in full precision.
        overrides: glob -> VQ settings, e.g. ``{"*.norm1.linear": {"codebook_size": 1024}}``.
        block_inputs: ``student`` (end to end, official) or ``teacher`` (every block gets its FP input).
        spread_blocks: under DDP, rank r of W calibrates the blocks b % W == r on all items (needs teacher inputs).
        regularizer: ratio regulariser, ``official`` (n r(1-r)) or ``paper`` (1-|2r-1|).
        regularizer_weight: lambda_r.
        regularizer_gating: official gating: add L_r only when it rose above its running minimum.
        gate_window: steps after which the gating minimum is reset.
        codebook_training: ``after_hardening`` (official) or ``simultaneous`` (with the ratios).
        optimizer: ``rmsprop`` (official: alpha 0.9, eps 1e-8) or ``adam``.
        lr_codebook: learning rate of the codebooks.
        lr_bias: learning rate of the quantized layers' biases.
        lr_logits: learning rate of the ratio logits.
        export_dir: where ``FinalAssignment`` writes the packed model (checked before any work).
        num_heads: attention heads, only for original ``.pt`` checkpoints of non-paper sizes.
        quantized: a packed model that ``test`` / ``predict`` / ``validate`` evaluate instead of calibrating.
        eval_model: what ``test`` / ``predict`` sample: ``quantized`` (and FP, same noise) or ``fp`` only.
        vae: diffusers ``AutoencoderKL`` folder or hub id decoding latents (None: pixel-space models).
        metrics_features: FID / IS features: ``classifier`` (digits), ``inception`` or ``auto``.
        real_images: FID reference: ``digits``, an ``.npz`` (``arr_0 [N, H, W, C]`` uint8), ``auto`` or None.
        teacher_dtype: the frozen teacher's dtype after the student is built (k-means and trajectories: float32).
        output_weight: weight of an output-level loss term (final noise MSE; default: the recipe's).
        bit_allocation: per-layer codebook sizes (k / 4 .. 4 k, same d) chosen from each layer's measured
            sensitivity so the quantized layers cost ``bit_budget`` (default: the recipe's).
        bit_budget: bits per weight all-in (codes, codebooks, row scales) of the quantized layers under
            ``bit_allocation`` (None: what the uniform k, d cost: the same bits, spent where they matter).
        error_feedback: assign candidates column group by column group, compensating each group's output
            error on the later columns under the teacher's E[x x^T] (GPTQ / GPTVQ; default: the recipe's).
    """

    def __init__(
        self,
        model: str = "tiny",
        bits: int = 2,
        codebook_size: int | None = None,
        subvector_dim: int | None = None,
        num_candidates: int = 2,
        ratio_init: RatioInit | None = None,
        kmeans_iters: int = 25,
        recipe: Recipe = "quality",
        row_scale: bool | None = None,
        kmeans_metric: KMeansMetric | None = None,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        overrides: dict[str, dict[str, int]] | None = None,
        block_inputs: BlockInputs = "student",
        spread_blocks: bool = False,
        regularizer: Regularizer = "official",
        regularizer_weight: float = 1.0,
        regularizer_gating: bool = True,
        gate_window: int = 50,
        codebook_training: CodebookTraining = "after_hardening",
        optimizer: OptimizerName = "rmsprop",
        lr_codebook: float = 1e-4,
        lr_bias: float = 1e-4,
        lr_logits: float = 5e-2,
        export_dir: str | None = None,
        num_heads: int | None = None,
        quantized: str | None = None,
        eval_model: EvalModel = "quantized",
        vae: str | None = None,
        metrics_features: MetricsFeatures = "auto",
        real_images: str | None = "auto",
        teacher_dtype: TeacherDtype = "float32",
        output_weight: float | None = None,
        bit_allocation: bool | None = None,
        bit_budget: float | None = None,
        error_feedback: bool | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        levers = recipe_settings(recipe, row_scale=row_scale, kmeans_metric=kmeans_metric, output_weight=output_weight,
                                 bit_allocation=True if bit_budget is not None and bit_allocation is None else bit_allocation,
                                 error_feedback=error_feedback, ratio_init=ratio_init)
        self.bit_allocation = levers["bit_allocation"]
        self.resume_checkpoint: str | None = None  # set by train.py when resuming: its allocation is reused
        self.vq_config = VQConfig.for_bits(
            bits, codebook_size, subvector_dim, num_candidates=num_candidates, ratio_init=levers["ratio_init"], kmeans_iters=kmeans_iters,
            row_scale=levers["row_scale"], kmeans_metric=levers["kmeans_metric"], error_feedback=levers["error_feedback"])
        self.calibration = CalibrationConfig(
            block_inputs, regularizer, regularizer_weight, regularizer_gating, gate_window, codebook_training,
            optimizer, lr_codebook, lr_bias, lr_logits, teacher_dtype, levers["output_weight"],
        )
        self.export_dir = export_dir  # FinalAssignment writes the packed model there
        self.evaluation = SampleEvaluation(model, eval_model, vae, metrics_features, real_images)
        self.teacher = (load_dit(model, num_heads=num_heads) if num_heads else load_dit(model)).requires_grad_(False).eval()
        check_module_settings(self)  # everything knowable now fails now, before any heavy work
        self.student: nn.Module | None = None
        self.engine: Calibrator | None = None
        self.data_settings = DataSettings()
        self.strict_loading = False  # the frozen teacher is not stored in checkpoints

    @property
    def shards_data(self) -> bool:
        """Whether DDP ranks split the calibration items (not when they split the blocks)."""
        return not self.hparams.spread_blocks

    def trajectory_teacher(self, device: torch.device) -> nn.Module:
        """The float32 teacher on ``device`` for the trajectories (the student's k-means follows it there)."""
        return self.teacher.to(device)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "settings"):
            self.data_settings = datamodule.settings()

    def configure_model(self) -> None:
        """Build the engine and its k-means student; or load ``quantized``; nothing for FP-only evaluation."""
        if self.student is not None:
            return
        stage = self._trainer.state.fn if self._trainer is not None else None
        if self.hparams.quantized is not None:
            if stage == "fit":
                raise ValueError("model.quantized is for test / predict / validate; resume a calibration with --ckpt_path")
            self.student = load_packed_student(self.hparams.quantized, self.teacher, self.device)
            self.engine = Calibrator(self.teacher, self.student, self.calibration, guidance_scale=self.data_settings.guidance_scale)
            return
        if self.hparams.eval_model == "fp" and stage in ("test", "predict"):
            return
        hp = self.hparams
        self.engine = Calibrator.build(
            self.teacher, self.vq_config, self.calibration, include=hp.include, exclude=hp.exclude,
            overrides=hp.overrides, guidance_scale=self.data_settings.guidance_scale,
            progress=self.global_rank == 0 if self._trainer else True, items=self.data_settings.train_items,
            bit_allocation=self.bit_allocation, bit_budget=hp.bit_budget,
            allocation=read_allocation(self.resume_checkpoint) if self.bit_allocation and self.resume_checkpoint else None,
        )
        self.student = self.engine.student
        if self.engine.allocation_report and self.global_rank == 0:
            print(self.engine.allocation_report, file=sys.stderr, flush=True)
        if hp.spread_blocks and self._trainer is not None and self.trainer.state.fn == "fit" and self.trainer.world_size > 1:
            self.engine.spread = BlockSpread.for_student(self.student, self.trainer.global_rank, self.trainer.world_size)
            # DDP refuses a module without a parameter to sync: a scalar that every loss uses with
            # weight 0 stays with DDP (one float all-reduced per step, a zero gradient, no optimizer).
            self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self._ddp_params_and_buffers_to_ignore = ddp_ignored(self.engine.layers, "student.", self.engine.spread is not None)

    def train(self, mode: bool = True) -> "CalibrationModule":  # both DiTs stay in eval mode:
        super().train(mode)  # train mode drops labels at random in every block
        self.teacher.eval()
        if self.student is not None:
            self.student.eval()
        return self

    # ----------------------------------------------------------------------------- calibration
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        out = self.engine.step_loss(batch, self.global_step)
        loss = out.loss
        if self.engine.spread is not None:
            loss = loss + 0.0 * self.ddp_anchor  # DDP's only parameter (see configure_model)
        batch_size = batch[0].shape[0]
        self.log_dict(
            {"train/loss": out.total, "train/block_mse": out.distillation, "train/ratio_loss": out.ratio,
             "train/output_mse": out.output_mse, "train/ratio_loss_applied": float(out.ratio_applied)},
            prog_bar=False, batch_size=batch_size,
        )
        self.log("loss", out.distillation, prog_bar=True, logger=False, batch_size=batch_size)
        self.log_dict({f"train/block_{i:02d}/mse": v for i, v in enumerate(out.block_mse)}, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        block_mse, output_mse = self.engine.block_losses(batch)
        block_mse = self.engine.global_sum(block_mse.detach())  # spread_blocks: every block from its owner
        batch_size, sync = batch[0].shape[0], self.engine.spread is None  # with a spread: already global
        self.log("val/block_mse", block_mse.mean(), prog_bar=True, sync_dist=sync, batch_size=batch_size)
        self.log("val/output_mse", output_mse, sync_dist=sync, batch_size=batch_size)

    @torch.no_grad()
    def validation_error(self, batches: list) -> dict[str, float]:
        """Mean block MSE and final-output MSE against the teacher over ``batches`` (validation items
        on this device) of the student as it would be exported now (soft rows at their argmax);
        read by ``callbacks.CalibrationReport``."""
        with argmax_view(self.student):
            pairs = [self.engine.block_losses(batch) for batch in batches]
        block = sum(float(self.engine.global_sum(b.detach()).mean()) for b, _ in pairs) / len(pairs)
        return {"block_mse": block, "output_mse": sum(float(o) for _, o in pairs) / len(pairs)}

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.engine.update_codebook_trainability()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return self.engine.make_optimizer()

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # Lightning zeroes gradients between the next forward and its backward, so the previous
        # step's gradients (as large as the ratio logits: 2.7 GB on DiT-XL/2 at w3) would stay
        # alive through the forward, the memory peak. Free them as soon as they are used.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)
        self.engine.check_finite_(self.global_step)  # a diverged run stops before anything is exported

    def on_after_backward(self) -> None:
        self.engine.average_gradients_(self.trainer.world_size)

    def share_blocks_(self) -> None:
        """Every rank gets every block's state from its owner (a collective; no-op without a
        spread). Before checkpoints, samples and the export."""
        if self.engine is not None and self.engine.spread is not None:
            self.engine.share_(self.trainer.optimizers[0] if self.trainer.optimizers else None, self.device)

    def on_train_epoch_end(self) -> None:
        self.share_blocks_()  # every rank holds the whole student at each epoch end (and at the end)

    def _eval_sampler(self):
        return self.evaluation.sampler(self.data_settings.eval_sampler, self.teacher)

    def on_test_start(self) -> None:
        self.evaluation.start_test(self.device, self.data_settings.eval_samples)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self.evaluation.test_step(self, batch, batch_idx, self._eval_sampler())

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluation.compute(), sync_dist=False)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self.evaluation.predict_step(self, batch, self._eval_sampler())

    # ----------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.engine is not None and self.engine.spread is not None:
            # Lightning took the state and optimizer state before this hook: take them again once
            # rank 0, which writes, holds every block's state and optimizer state.
            self.share_blocks_()
            checkpoint["state_dict"] = self.trainer.strategy.lightning_module_state_dict()
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [self.trainer.strategy.optimizer_state(o) for o in self.trainer.optimizers]
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.") and k != "ddp_anchor"
        }
        checkpoint["vq4dit"] = self.engine.state_dict()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("vq4dit")
        if saved is None:
            raise ValueError("this checkpoint was not written by vq4dit calibration")
        self.engine.load_state_dict(saved)
        own = {k for k in self.state_dict() if not k.startswith("teacher.") and k != "ddp_anchor"}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"cannot resume: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
