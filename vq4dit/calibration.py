"""The VQ4DiT calibration LightningModule: FP teacher, VQ student, block-wise loss, optimisers.

Every DiT block is a calibration target (paper Eq. 8): the loss is the mean over blocks of the MSE
between the teacher's and the student's block outputs, plus the ratio regulariser (Eq. 9-10).
``block_inputs="student"`` runs the quantized network end to end (block ``l`` sees quantized
block ``l-1``'s output: the official code); ``"teacher"`` feeds each quantized block the FP input
of that block (blocks independent).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from .distributed import BlockSpread, BlockSpreading
from .evaluation import EvaluationSteps
from .models import block_modules, capture_blocks, load_dit
from .layers import VQLinear, quantize_, vq_layers
from .vq_config import VQConfig
from .sampling import NULL_CLASS
from .soft import logit_regularizer

BlockInputs = Literal["student", "teacher"]
CodebookTraining = Literal["after_hardening", "simultaneous"]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_writable_dir(path: str) -> None:
    """Raise ``ValueError`` if ``path`` cannot be created or written (before any heavy work)."""
    target = Path(path).resolve()
    probe = target
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise ValueError(f"export_dir {path!r} is not writable ({probe} is not a writable folder)")
    if target.exists() and not target.is_dir():
        raise ValueError(f"export_dir {path!r} exists and is not a folder")


class CalibrationModule(EvaluationSteps, BlockSpreading, pl.LightningModule):
    """VQ4DiT calibration of a DiT: zero-data, block-wise, with soft candidate assignments.

    Args:
        model: anything ``vq4dit.load_dit`` accepts: preset (``tiny``, ``DiT-XL/2-256``), diffusers
            folder or hub id, original DiT ``.pt`` file, or ``reference`` (the shipped digits DiT).
        bits: 2 or 3 (the paper presets: k=256, d=4 / k=64, d=2); ignored where
            ``codebook_size``/``subvector_dim`` are given.
        codebook_size: explicit k (power of two).
        subvector_dim: explicit d.
        num_candidates: candidate codewords per sub-vector (n; 1 = plain VQ, codebook-only).
        ratio_init: ``inverse_distance`` (official) or ``uniform``.
        kmeans_iters: Lloyd iterations of the codebook initialisation.
        include: glob patterns of Linear layers to quantize (default: the 7 core Linears per block).
        exclude: glob patterns removed from the selection.
        overrides: glob pattern -> VQ settings, e.g. ``{"*.norm1.linear": {"codebook_size": 1024}}``.
        block_inputs: ``student`` (end to end, official) or ``teacher`` (each block gets FP inputs).
        spread_blocks: under DDP, rank r of W calibrates only blocks b with b % W == r, on all
            calibration items (no data sharding): the same result as one process, with the
            student's forward/backward split over ranks. Needs ``block_inputs: teacher``; a no-op
            in one process.
        regularizer: ratio regulariser form, ``official`` (n r(1-r)) or ``paper`` (1-|2r-1|).
        regularizer_weight: lambda_r.
        regularizer_gating: official gating: add L_r only when it rose above its running minimum.
        gate_window: steps after which the gating minimum is reset (official: one trajectory).
        codebook_training: ``after_hardening`` (a layer's codebook trains once all its rows are
            hard: official code) or ``simultaneous`` (with the ratios: the paper's wording).
        optimizer: ``rmsprop`` (official: alpha 0.9, eps 1e-8) or ``adam``.
        lr_codebook: learning rate of codebooks.
        lr_bias: learning rate of the quantized layers' biases.
        lr_logits: learning rate of the ratio logits.
        export_dir: where ``FinalAssignment`` writes the packed model (checked before any work).
        num_heads: attention heads, only for original ``.pt`` checkpoints of non-paper sizes.
        quantized: a packed model folder (``export_dir`` of an earlier run) that ``test`` /
            ``predict`` / ``validate`` evaluate instead of quantizing ``model`` again.
        eval_model: what ``test`` / ``predict`` sample from: ``quantized`` (the student, compared
            with the FP model under identical noise) or ``fp`` (the teacher only: FP baseline).
        vae: diffusers ``AutoencoderKL`` (folder or hub id) decoding latents into images for
            ``test`` / ``predict``; None for pixel-space models (the reference model).
        metrics_features: feature network of FID / IS / precision / recall: ``classifier`` (the
            digits classifier, offline), ``inception`` (needs torch-fidelity) or ``auto``
            (classifier for the reference model, Inception otherwise).
        real_images: real data of FID / precision / recall: ``digits``, an ``.npz`` with
            ``arr_0 [N, H, W, C]`` uint8 (e.g. the ADM ImageNet reference batch), ``auto``
            (digits for the reference model) or None (FID to the FP samples only).
        teacher_dtype: ``float32`` or ``bfloat16``: dtype of the frozen teacher once the student
            is built (k-means and the trajectories use float32). ``bfloat16`` halves the
            teacher's memory and speeds its forward; under ``bf16-mixed`` the targets barely
            change (its matmuls run in bf16 anyway), under ``32-true`` they are bf16-rounded.
    """

    def __init__(
        self,
        model: str = "tiny",
        bits: int = 2,
        codebook_size: int | None = None,
        subvector_dim: int | None = None,
        num_candidates: int = 2,
        ratio_init: str = "inverse_distance",
        kmeans_iters: int = 25,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        overrides: dict[str, dict[str, int]] | None = None,
        block_inputs: str = "student",
        spread_blocks: bool = False,
        regularizer: str = "official",
        regularizer_weight: float = 1.0,
        regularizer_gating: bool = True,
        gate_window: int = 50,
        codebook_training: str = "after_hardening",
        optimizer: str = "rmsprop",
        lr_codebook: float = 1e-4,
        lr_bias: float = 1e-4,
        lr_logits: float = 5e-2,
        export_dir: str | None = None,
        num_heads: int | None = None,
        quantized: str | None = None,
        eval_model: str = "quantized",
        vae: str | None = None,
        metrics_features: str = "auto",
        real_images: str | None = "auto",
        teacher_dtype: str = "float32",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        _check_choice("block_inputs", block_inputs, ("student", "teacher"))
        if spread_blocks and block_inputs != "teacher":
            raise ValueError(
                "spread_blocks needs block_inputs='teacher' (blocks are only independent when each "
                f"gets its FP input), got block_inputs={block_inputs!r}"
            )
        _check_choice("regularizer", regularizer, ("official", "paper"))
        _check_choice("codebook_training", codebook_training, ("after_hardening", "simultaneous"))
        _check_choice("optimizer", optimizer, ("rmsprop", "adam"))
        _check_choice("eval_model", eval_model, ("quantized", "fp"))
        _check_choice("metrics_features", metrics_features, ("auto", "classifier", "inception"))
        _check_choice("teacher_dtype", teacher_dtype, ("float32", "bfloat16"))
        if quantized is not None and not (Path(quantized) / "config.json").is_file():
            raise ValueError(f"quantized={quantized!r} is not a packed vq4dit model folder (no config.json)")
        for name in ("lr_codebook", "lr_bias", "lr_logits", "regularizer_weight"):
            if not getattr(self.hparams, name) >= 0 or not math.isfinite(getattr(self.hparams, name)):
                raise ValueError(f"{name} must be a finite number >= 0, got {getattr(self.hparams, name)}")
        if gate_window < 1:
            raise ValueError(f"gate_window must be >= 1, got {gate_window}")
        self.vq_config = self._vq_config()
        if export_dir is not None:
            check_writable_dir(export_dir)

        self.teacher = load_dit(model, num_heads=num_heads) if num_heads else load_dit(model)
        self.teacher.requires_grad_(False).eval()
        self.student: nn.Module | None = None
        self.strict_loading = False  # the frozen teacher is not stored in checkpoints
        self._gate_minimum = math.inf
        self.spread: BlockSpread | None = None  # set by configure_model under DDP with spread_blocks

    def _vq_config(self) -> VQConfig:
        hp = self.hparams
        if hp.bits not in (2, 3):
            raise ValueError(
                f"bits must be 2 or 3 (the paper presets), got {hp.bits!r}; "
                "codebook_size and subvector_dim override the preset for other settings"
            )
        preset = VQConfig.from_bits(hp.bits)
        k = hp.codebook_size or preset.codebook_size
        d = hp.subvector_dim or preset.subvector_dim
        return VQConfig(
            codebook_size=k, subvector_dim=d, num_candidates=hp.num_candidates,
            ratio_init=hp.ratio_init, kmeans_iters=hp.kmeans_iters,
        )

    # ------------------------------------------------------------------------------ model setup
    def configure_model(self) -> None:
        """Build the student: a copy of the teacher with VQ layers (k-means initialised), or the
        packed model ``quantized`` for evaluation; none when only the FP model is evaluated."""
        if self.student is not None:
            return
        stage = self._trainer.state.fn if self._trainer is not None else None
        if self.hparams.quantized is not None:
            if stage == "fit":
                raise ValueError("model.quantized is for test / predict / validate; resume a calibration with --ckpt_path")
            self.student = self._load_packed(self.hparams.quantized)
            return
        if self.hparams.eval_model == "fp" and stage in ("test", "predict"):
            return
        # New modules, but the frozen tensors are shared with the frozen teacher (nothing writes
        # them): a deep copy would hold a second set of weights (3 GB on DiT-XL/2) that the
        # quantized layers then replace anyway.
        shared = {id(t): t for t in (*self.teacher.parameters(), *self.teacher.buffers())}
        student = copy.deepcopy(self.teacher, memo=shared)
        quantize_(
            student, self.vq_config, include=self.hparams.include, exclude=self.hparams.exclude,
            overrides=self.hparams.overrides, progress=self.global_rank == 0 if self._trainer else True,
        )
        for layer in vq_layers(student).values():
            layer.candidate_logits.requires_grad_(True)
            if layer.bias is not None:
                layer.bias.requires_grad_(True)
        self.student = student.eval()
        self.update_codebook_trainability()
        # Codebooks and ratio logits change shape/trainability during calibration: DDP's fixed
        # buckets cannot follow, so their gradients are averaged by hand (on_after_backward).
        ignored = [
            f"student.{name}.{p}"
            for name in vq_layers(student)
            for p in ("codebook", "candidate_logits", "codes", "soft_rows", "candidates")
        ]
        self._ddp_params_and_buffers_to_ignore = ignored
        self._configure_spread_blocks()
        if self.hparams.get("teacher_dtype", "float32") != "float32":
            self._cast_teacher(getattr(torch, self.hparams.teacher_dtype))

    def _cast_teacher(self, dtype: torch.dtype) -> None:
        """New ``dtype`` tensors for the teacher (the student keeps the float32 ones it shared),
        and a pre-hook casting floating inputs, so every caller may keep passing float32."""
        for module in self.teacher.modules():
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if tensor.is_floating_point():
                    cast = tensor.detach().to(dtype)
                    setattr(module, name, nn.Parameter(cast, requires_grad=False) if isinstance(tensor, nn.Parameter) else cast)

        def cast_inputs(_module, args, kwargs):
            cast = lambda v: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v  # noqa: E731
            return tuple(map(cast, args)), {key: cast(value) for key, value in kwargs.items()}

        self.teacher.register_forward_pre_hook(cast_inputs, with_kwargs=True)

    def _load_packed(self, path: str) -> nn.Module:
        from .export import load_quantized

        student = load_quantized(path, device=self.device)
        mine = {k: v for k, v in self.teacher.config.items() if not k.startswith("_")}
        theirs = {k: v for k, v in student.config.items() if not k.startswith("_")}
        differing = sorted(k for k in mine if k in theirs and mine[k] != theirs[k])
        if differing:
            raise ValueError(
                f"the packed model {path} does not fit model={self.hparams.model!r}: "
                + ", ".join(f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in differing)
            )
        return student.eval()

    def update_codebook_trainability(self) -> None:
        """Codebooks train with the ratios (``simultaneous``) or once their layer is hard."""
        for layer in self.vq_layers().values():
            trainable = self.hparams.codebook_training == "simultaneous" or layer.is_hard
            layer.codebook.requires_grad_(trainable)

    def vq_layers(self) -> dict[str, VQLinear]:
        return vq_layers(self.student) if self.student is not None else {}

    def train(self, mode: bool = True) -> "CalibrationModule":
        # Both DiTs always run in eval mode: train mode drops labels at random in every block.
        super().train(mode)
        self.teacher.eval()
        if self.student is not None:
            self.student.eval()
        return self

    # ---------------------------------------------------------------------------------- forward
    def _model_batch(self, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x, t, y = batch
        guidance = getattr(getattr(self.trainer, "datamodule", None), "hparams", {}).get("guidance_scale", 1.0) \
            if self._trainer is not None else 1.0
        if guidance > 1.0:  # calibrate the null-label path too, as it is used in guided sampling
            x, t, y = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])
        return x, t, y

    def block_losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-block MSE ``[L]`` between teacher and student, and the final-output MSE."""
        x, t, y = self._model_batch(batch)
        teacher_blocks, student_blocks = block_modules(self.teacher), block_modules(self.student)
        teaching_inputs = self.hparams.block_inputs == "teacher"
        with torch.no_grad(), capture_blocks(teacher_blocks, record_inputs=teaching_inputs) as (t_out, t_in):
            teacher_final = self.teacher(x, timestep=t, class_labels=y).sample
        if teaching_inputs:  # under spread_blocks only this rank's blocks (others: None)
            owned = range(len(student_blocks)) if self.spread is None else self.spread.owned_blocks
            s_out = [
                block(*args, **kwargs) if index in owned else None
                for index, (block, (args, kwargs)) in enumerate(zip(student_blocks, t_in))
            ]
            output_mse = torch.tensor(float("nan"), device=x.device)
        else:
            with capture_blocks(student_blocks) as (s_out, _):
                student_final = self.student(x, timestep=t, class_labels=y).sample
            output_mse = F.mse_loss(student_final.detach().float(), teacher_final.float())
        zero = torch.zeros((), device=x.device)
        block_mse = torch.stack([zero if s is None else F.mse_loss(s.float(), tt.float()) for s, tt in zip(s_out, t_out)])
        return block_mse, output_mse

    def ratio_terms(self) -> dict[str, torch.Tensor]:
        """The regulariser of every soft layer this rank calibrates (all layers without a spread)."""
        layers = self.owned_vq_layers().items()
        kind = self.hparams.regularizer
        return {name: logit_regularizer(layer.candidate_logits, kind) for name, layer in layers if not layer.is_hard}

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        block_mse, output_mse = self.block_losses(batch)  # [L]; spread_blocks: 0 for other ranks' blocks
        terms, names = self.ratio_terms(), list(self.vq_layers())
        # Every block MSE and every soft layer's L_r has one owner: summed over ranks, each rank
        # sees the values of one process, so the logs, the gating and the stop rule agree.
        zero = torch.zeros((), device=block_mse.device)
        local = torch.cat([
            block_mse.detach().float(),
            torch.stack([terms[n].detach().float() if n in terms else zero for n in names]),  # [M] L_r
            torch.tensor([float(n in terms) for n in names], device=block_mse.device),  # [M] soft layer
        ])
        summed = self.global_sum(local)
        num_blocks, num_layers = block_mse.numel(), len(names)
        all_mse, all_r = summed[:num_blocks], summed[num_blocks : num_blocks + num_layers]
        soft = summed[num_blocks + num_layers :] > 0
        loss_d = all_mse.mean()
        loss_r = all_r[soft].mean() if soft.any() else zero
        apply_r = True
        if self.hparams.regularizer_gating:
            if self.global_step % self.hparams.gate_window == 0:
                self._gate_minimum = math.inf
            value = float(loss_r.detach())
            apply_r = value > self._gate_minimum
            self._gate_minimum = min(self._gate_minimum, value)
        # This rank's part: the same gradients as mean over all blocks + lambda_r x mean over soft layers.
        loss = block_mse.sum() / num_blocks
        if apply_r and terms:
            loss = loss + self.hparams.regularizer_weight * (torch.stack(list(terms.values())).sum() / int(soft.sum()))
        if self.spread is not None:
            loss = loss + 0.0 * self.ddp_anchor  # DDP's only parameter (see _configure_spread_blocks)
        total = loss_d + (self.hparams.regularizer_weight * loss_r if apply_r else 0.0)
        batch_size = batch[0].shape[0]
        self.log_dict(
            {"train/loss": total, "train/block_mse": loss_d, "train/ratio_loss": loss_r,
             "train/output_mse": output_mse, "train/ratio_loss_applied": float(apply_r)},
            prog_bar=False, batch_size=batch_size,
        )
        self.log("loss", loss_d, prog_bar=True, logger=False, batch_size=batch_size)
        self.log_dict({f"train/block_{i:02d}/mse": v for i, v in enumerate(all_mse)}, batch_size=batch_size)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        block_mse, output_mse = self.block_losses(batch)
        block_mse = self.global_sum(block_mse.detach())  # spread_blocks: every block from its owner
        batch_size, sync = batch[0].shape[0], self.spread is None  # with a spread: already global
        self.log("val/block_mse", block_mse.mean(), prog_bar=True, sync_dist=sync, batch_size=batch_size)
        self.log("val/output_mse", output_mse, sync_dist=sync, batch_size=batch_size)

    # --------------------------------------------------------------------------- optimisation
    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        self.update_codebook_trainability()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        layers = self.vq_layers().values()
        groups = [
            {"params": [l.codebook for l in layers], "lr": self.hparams.lr_codebook, "name": "codebooks"},
            {"params": [l.bias for l in layers if l.bias is not None], "lr": self.hparams.lr_bias, "name": "biases"},
            {"params": [l.candidate_logits for l in layers], "lr": self.hparams.lr_logits, "name": "ratio_logits"},
        ]
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(groups)
        return torch.optim.RMSprop(groups, alpha=0.9, eps=1e-8, momentum=0.0, weight_decay=0.0)

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        # Lightning zeroes gradients between the next forward and its backward, so the previous
        # step's gradients (as large as the ratio logits: 2.7 GB on DiT-XL/2 at w3) would stay
        # alive through the forward, the memory peak. Free them as soon as they are used.
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        optimizer.zero_grad(set_to_none=True)

    def on_after_backward(self) -> None:
        self.average_vq_gradients_()

    # ----------------------------------------------------------------------------- checkpoints
    def on_train_epoch_end(self) -> None:
        # spread_blocks: all ranks hold the whole student at every epoch end, so at the end of
        # training too (before FinalAssignment's argmax and export, and SampleImages at fit end).
        self.share_blocks_()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.spread is not None:
            # Lightning took the state and optimizer state before this hook: take them again once
            # every rank (rank 0, which writes) holds every block's state and optimizer state.
            self.share_blocks_()
            checkpoint["state_dict"] = self.trainer.strategy.lightning_module_state_dict()
            if "optimizer_states" in checkpoint:
                checkpoint["optimizer_states"] = [self.trainer.strategy.optimizer_state(o) for o in self.trainer.optimizers]
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("teacher.") and k != "ddp_anchor"
        }
        checkpoint["vq4dit"] = {
            "layers": sorted(self.vq_layers()), "vq_config": vars(self.vq_config), "gate_minimum": self._gate_minimum,
        }

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("vq4dit")
        if saved is None:
            raise ValueError("this checkpoint was not written by vq4dit calibration")
        mine = {"layers": sorted(self.vq_layers()), "vq_config": vars(self.vq_config)}
        if saved["vq_config"] != mine["vq_config"] or saved["layers"] != mine["layers"]:
            raise ValueError(
                "cannot resume: the checkpoint was calibrated with another configuration "
                f"(checkpoint: {saved['vq_config']}, {len(saved['layers'])} layers; "
                f"this run: {mine['vq_config']}, {len(mine['layers'])} layers)"
            )
        self._gate_minimum = saved.get("gate_minimum", math.inf)
        own = {k for k in self.state_dict() if not k.startswith("teacher.") and k != "ddp_anchor"}
        missing = sorted(own - set(checkpoint["state_dict"]))
        if missing:
            raise ValueError(f"cannot resume: the checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
