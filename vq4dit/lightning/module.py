"""The calibration LightningModule: owns the ``--model.*`` settings (typed groups, resolved once by
the recipe) and calls :class:`vq4dit.engine.Calibrator` from its hooks; evaluation is delegated to
:class:`SampleEvaluation`, block spreading to :class:`vq4dit.distributed.BlockSpread`."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from lightning_fabric.utilities.apply_func import move_data_to_device
from torch import nn

from ..distributed import BlockSpread, ddp_ignored
from ..engine import CalibrationConfig, Calibrator, load_packed_student
from ..engine.config import BitAllocation, LayerSelection
from ..engine.windows import held_out
from ..families import batch_size as items_in
from ..models import load_dit
from ..quantize import argmax_view
from ..recipes import Recipe
from ..typed_settings import unset
from ..vq_config import VQConfig
from .data import DataSettings
from .evaluation import EvaluationSettings, SampleEvaluation
from .resume import read_allocation
from .settings import ExportSettings, record, resolve, typed_arguments
from .validation import check_module_settings


class CalibrationModule(pl.LightningModule):
    """VQ4DiT calibration of a DiT: zero-data, block-wise, with soft candidate assignments.

    Every setting is declared once, in its group's dataclass; the command line parses the groups
    as nested sections (``--model.vq.bits 3``, ``model: {vq: {bits: 3}}``). Settings left None are
    decided by ``recipe`` (:func:`vq4dit.recipes.apply_recipe`); ``self.settings`` is the resolved
    object, and the hyperparameters (checkpoints, the resume check, the model card) are its record.
    In Python a group may be a dict of the fields set (``vq={"bits": 3}``: the others as on the
    command line); a dataclass built directly holds the paper's values for the recipe fields.

    Args:
        model: ``reference``, a preset (``DiT-XL/2-256``), a diffusers folder or hub id, or an original DiT ``.pt``.
        recipe: ``quality`` (default: the levers measured better, see README) or ``paper`` (the paper's method):
            the values of the settings left unset (None).
        vq: the VQ settings of every quantized layer (``layers.overrides`` changes them per layer).
        calibration: how the assignments, codebooks and biases are calibrated.
        allocation: per-layer codebook sizes from measured sensitivity, under a bit budget.
        layers: which Linear layers are quantized, and per-layer VQ settings.
        export: where the packed model is written.
        evaluation: what ``test`` / ``predict`` / ``validate`` evaluate.
        num_heads: attention heads, only for original ``.pt`` checkpoints of non-paper sizes.
        spread_blocks: under DDP, rank r of W calibrates the blocks b % W == r on all items (needs teacher inputs).
        offload_blocks: with ``calibration.window_blocks``, the student blocks outside the window live on the CPU
            (from the student build on: it goes window by window, :mod:`vq4dit.engine.window_build`).
    """

    def __init__(
        self,
        *,
        model: str = "tiny",
        recipe: Recipe = "quality",
        vq: VQConfig = unset(VQConfig),
        calibration: CalibrationConfig = unset(CalibrationConfig),
        allocation: BitAllocation = unset(BitAllocation),
        layers: LayerSelection = LayerSelection(),
        export: ExportSettings = ExportSettings(),
        evaluation: EvaluationSettings = EvaluationSettings(),
        num_heads: int | None = None,
        spread_blocks: bool = False,
        offload_blocks: bool = False,
    ) -> None:
        super().__init__()
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        self.settings = resolve(typed_arguments(CalibrationModule.__init__, arguments))
        self.save_hyperparameters(record(self.settings))  # plain dicts: weights_only checkpoint loading
        self.vq_config: VQConfig = self.settings["vq"]
        self.calibration: CalibrationConfig = self.settings["calibration"]
        self.allocation: BitAllocation = self.settings["allocation"]
        self.layer_selection: LayerSelection = self.settings["layers"]
        self.export_dir = self.settings["export"].dir  # FinalAssignment writes the packed model there
        self.quantized = self.settings["evaluation"].quantized
        self.resume_checkpoint: str | None = None  # set by train.py when resuming: its allocation is reused
        # set by a callback that wants the student as built (the start) when a checkpoint is loaded
        # over it: ``built_start`` then holds its engine.snapshot() (the build is deterministic)
        self.keep_built_start = False
        self.built_start: dict | None = None
        self.evaluation = SampleEvaluation(model, self.settings["evaluation"])
        self.teacher = (load_dit(model, num_heads=num_heads) if num_heads else load_dit(model)).requires_grad_(False).eval()
        check_module_settings(self)  # everything knowable now fails now, before any heavy work
        self.student: nn.Module | None = None
        self.engine: Calibrator | None = None
        self.data_settings = DataSettings()
        self.strict_loading = False  # the frozen teacher is not stored in checkpoints

    @property
    def shards_data(self) -> bool:
        """Whether DDP ranks split the calibration items (not when they split the blocks)."""
        return not self.settings["spread_blocks"]

    @property
    def fixed_batches(self) -> bool:
        """Whether the data module must repeat the same training batches every epoch (recorded window inputs find them by content)."""
        return self.calibration.window_inputs != "recompute"

    @property
    def student_offloaded(self) -> bool:
        """Whether student blocks live on the CPU now (``offload_blocks``): no whole-student forward
        on the device until the windows end (``callbacks.SampleImages`` waits for the end)."""
        window = None if self.engine is None else self.engine.window
        return window is not None and bool(window.parked(self.student))

    def check_processes(self, world_size: int) -> None:
        """``ValueError`` for settings that need one process: block-by-block calibration (its
        trainable parameters change with the window, which DDP's fixed buckets cannot follow)."""
        if self.calibration.window_blocks is not None and world_size > 1:
            raise ValueError(f"calibration.window_blocks runs in one process, got {world_size} "
                             "(several GPUs: spread_blocks instead)")

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
        if self.quantized is not None:
            if stage == "fit":
                raise ValueError("model.quantized is for test / predict / validate (model.evaluation.quantized); "
                                 "resume a calibration with --ckpt_path")
            self.student = load_packed_student(self.quantized, self.teacher, self.device)
            hard = dataclasses.replace(self.calibration, window_blocks=None, window_inputs="recompute")  # every block at once
            self.engine = Calibrator(self.teacher, self.student, hard, guidance_scale=self.data_settings.guidance_scale)
            return
        if self.settings["evaluation"].model == "fp" and stage in ("test", "predict"):
            return
        layers, allocate = self.layer_selection, self.allocation.enabled
        if self._trainer is not None:
            self.check_processes(self.trainer.world_size)
        calibration = self.calibration
        if calibration.window_inputs == "disk" and calibration.window_inputs_dir is None and self._trainer is not None:
            folder = str(Path(self.trainer.default_root_dir) / "window_inputs")
            calibration = dataclasses.replace(calibration, window_inputs_dir=folder)
        self.engine = Calibrator.build(
            self.teacher, self.vq_config, calibration, include=layers.include, exclude=layers.exclude,
            overrides=layers.overrides, filter_fn=layers.linear_filter(self.teacher),
            guidance_scale=self.data_settings.guidance_scale,
            progress=self.global_rank == 0 if self._trainer else True, items=self.data_settings.train_items,
            bit_allocation=allocate, bit_budget=self.allocation.budget,
            allocation=read_allocation(self.resume_checkpoint) if allocate and self.resume_checkpoint else None,
            allocation_config=self.allocation, offload_blocks=self.settings["offload_blocks"],
        )
        self.student = self.engine.student
        if self.engine.window is not None:  # block-by-block: window 0's blocks on the device, with offload the others on the CPU
            self.engine.window.offload = self.settings["offload_blocks"]
            self.engine.place_(self.trainer.strategy.root_device if self._trainer is not None else self.device)
        if self.engine.allocation_report and self.global_rank == 0:
            print(self.engine.allocation_report, file=sys.stderr, flush=True)
        if self.settings["spread_blocks"] and self._trainer is not None and self.trainer.state.fn == "fit" and self.trainer.world_size > 1:
            self.engine.spread = BlockSpread.for_student(self.student, self.trainer.global_rank, self.trainer.world_size)
            # DDP refuses a module without a parameter to sync: a scalar that every loss uses with
            # weight 0 stays with DDP (one float all-reduced per step, a zero gradient, no optimizer).
            self.ddp_anchor = nn.Parameter(torch.zeros(()))
        self._ddp_params_and_buffers_to_ignore = ddp_ignored(self.engine.layers, "student.", self.engine.spread is not None)

    def _apply(self, fn, recurse: bool = True):
        # Lightning moves the whole module to its device: the blocks offloaded to the CPU stay there
        engine = getattr(self, "engine", None)
        parked = engine.window.parked(self.student) if engine is not None and engine.window is not None else []
        with held_out(self, parked):
            return super()._apply(fn, recurse)

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
        batch_size = items_in(batch)
        self.log_dict(
            {"train/loss": out.total, "train/block_mse": out.distillation, "train/ratio_loss": out.ratio,
             "train/output_mse": out.output_mse, "train/ratio_loss_applied": float(out.ratio_applied)},
            prog_bar=False, batch_size=batch_size,
        )
        self.log("loss", out.distillation, prog_bar=True, logger=False, batch_size=batch_size)
        blocks = self.engine.calibrated_blocks(out.block_mse.numel())  # under a window: the window's
        self.log_dict({f"train/block_{i:02d}/mse": out.block_mse[i] for i in blocks}, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        block_mse, output_mse = self.engine.block_losses(batch)
        block_mse = self.engine.global_sum(block_mse.detach())  # spread_blocks: every block from its owner
        batch_size, sync = items_in(batch), self.engine.spread is None  # with a spread: already global
        block_mse = block_mse[self.engine.calibrated_blocks(block_mse.numel())]  # under a window: the window's
        self.log("val/block_mse", block_mse.mean(), prog_bar=True, sync_dist=sync, batch_size=batch_size)
        self.log("val/output_mse", output_mse, sync_dist=sync, batch_size=batch_size)

    @torch.no_grad()
    def validation_error(self, batches: list) -> dict[str, float]:
        """Mean block MSE and final-output MSE against the teacher over ``batches`` (validation items
        on this device) of the student as it would be exported now (soft rows at their argmax);
        read by ``callbacks.CalibrationReport``. Under a window: every block, one window at a time."""
        with argmax_view(self.student):
            windows = [[self.engine.block_losses(batch) for batch in batches] for _ in self.engine.each_window(self.device)]
        pairs = [(sum(w[i][0] for w in windows), windows[0][i][1]) for i in range(len(batches))]  # [L] over windows
        block = sum(float(self.engine.global_sum(b.detach()).mean()) for b, _ in pairs) / len(pairs)
        return {"block_mse": block, "output_mse": sum(float(o) for _, o in pairs) / len(pairs)}

    def on_train_start(self) -> None:
        self.engine.place_(self.device)  # a resumed window's blocks (and only they) on the device
        self.record_window_inputs_()  # a resumed window's recorded inputs

    def on_train_end(self) -> None:
        self.engine.finish_windows_(self.device)  # after the callbacks' (FinalAssignment's argmax): all on the device

    def advance_window_(self) -> int:
        """Harden the window's layers and move on to the next window (``callbacks.BlockWindows``
        decides when). Returns the number of rows finalised."""
        rows = self.engine.advance_window_(self.trainer.optimizers[0] if self.trainer.optimizers else None, self.device)
        self.record_window_inputs_()
        return rows

    def record_window_inputs_(self) -> None:
        """Record the teacher's input of the window's first block for every training batch
        (``calibration.window_inputs`` memory / disk; under the steps' precision context), and say so."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.engine.window_inputs is None or datamodule is None:
            return
        loader = datamodule.train_dataloader()
        batches = (move_data_to_device(batch, self.device) for batch in loader)
        progress = self.trainer.is_global_zero and self.trainer.progress_bar_callback is not None
        with self.trainer.precision_plugin.train_step_context():
            line = self.engine.record_window_inputs_(batches, len(loader.dataset), progress=progress)
        if line is not None:
            (rank_zero_warn if self.engine.window_inputs.stopped else rank_zero_info)(line)

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
        data = self.data_settings
        self.evaluation.start_test(self.device, data.eval_samples, data.prompts, data.prompt_classes)

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
        if self.keep_built_start:  # before the checkpoint replaces it: the first run's start, built again
            self.built_start = self.engine.snapshot()
        self.engine.load_state_dict(saved)
        own = {k for k in self.state_dict() if not k.startswith("teacher.") and k != "ddp_anchor"}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"cannot resume: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
