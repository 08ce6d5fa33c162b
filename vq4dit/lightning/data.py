"""The calibration LightningDataModule: the FP teacher's trajectories as training and validation
items, the evaluation plan for ``test`` / ``predict``.

Trajectories are generated once, up front in ``setup``, on the trainer's device (and optionally
cached on disk), because the teacher's sampling costs as much as one epoch of calibration forwards
and a fixed set makes shuffling, resume and DDP sharding exact. Under DDP, rank ``r`` of ``W``
generates and uses trajectories ``r, r + W, ...``: none duplicated, none dropped. When the module
spreads blocks over ranks (ranks split the blocks, not the data) every rank generates and uses all
of them, in the same order.

The contract with the LightningModule is explicit and typed: the data module asks it once, in
``setup``, for the teacher (:meth:`CalibrationModule.trajectory_teacher`) and whether ranks share
the items (``shards_data``); the module asks for :meth:`CalibrationDataModule.settings` once, in
its own ``setup``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ..evaluation import evaluation_plan
from ..families import family_of
from ..prompts import check_encodable, check_prompts_fit, file_digest, load_prompt_embeds, prompt_classes
from ..prompts.encode import encode_file, read_prompts
from ..sampling import SamplerConfig
from ..trajectories import EvaluationBatches, ShuffledBatches, TrajectoryPlan, cached_items
from .validation import check_writable_dir


@dataclass(frozen=True)
class DataSettings:
    """The data settings the LightningModule needs: the calibration guidance (null-label batches
    when > 1), the sampler and sample count of ``test`` / ``predict``, the training items."""

    guidance_scale: float = 1.0
    eval_sampler: SamplerConfig | None = None
    eval_samples: int = 0
    train_items: dict | None = None  # this rank's calibration items (activation statistics)
    prompts: dict | None = None  # a text model's prompt table (load_prompt_embeds): test / predict sample prompt i mod N
    prompt_classes: torch.Tensor | None = None  # [N] the class each prompt names, when its file says


class CalibrationDataModule(pl.LightningDataModule):
    """Zero-data calibration items from the FP teacher's sampling trajectories.

    Args:
        num_trajectories: training trajectories (in all ranks together; divisible by world size,
            except with the module's ``spread_blocks``, where every rank uses all of them).
        classes_per_trajectory: samples (random classes, or prompts) per trajectory; the official code uses 4.
        batch_size: items per optimisation step; each item is also fed with the null label (the
            negative prompt) when ``guidance_scale > 1``, so the model batch is twice this (official: 4 + 4).
        num_classes: labels are drawn from ``0 .. num_classes-1``; default: the model's table size
            (ignored for text-conditioned models).
        prompt_embeds: the calibration prompts of a text-conditioned model (PixArt): a safetensors
            file with ``prompt_embeds [N, T, C]``, ``prompt_attention_mask [N, T]``,
            ``negative_prompt_embeds [1, T, C]``, ``negative_prompt_attention_mask [1, T]``
            (``python -m vq4dit.prompts encode`` writes one); the N prompts are cycled over the trajectories.
            SD3 adds ``pooled_prompt_embeds [N, P]`` and ``negative_pooled_prompt_embeds [1, P]``; Flux
            has ``prompt_embeds``, ``prompt_attention_mask`` and ``pooled_prompt_embeds`` only.
            One prompt source: this or ``prompts`` (``train.py``: the one given as a flag replaces
            the one a config names).
        prompts: the calibration prompts as text (one a line), encoded once before the trajectories
            by ``text_encoder`` and cached (``cache_dir``, else ``~/.cache/vq4dit``; ``VQ4DIT_CACHE``),
            keyed on the prompts, the negative prompt, the settings and the encoder's files.
        text_encoder: the pipeline whose tokenizer and text encoder encode ``prompts`` (a folder, a
            hub id or ``pixart_reference``); default: the model's own source.
        negative_prompt: the unconditional branch's prompt when encoding ``prompts`` (default empty).
        sampler: ``ddpm`` (original DiT, learned variance) or ``ddim``; None: ``ddpm``. Flow-matching
            models (SD3, Flux) sample as their pipeline does and refuse a value here.
        num_steps: sampling steps of the schedule used at inference (default 50).
        guidance_scale: classifier-free guidance of the teacher's sampling (official code: 4.0).
        guided_channels: leading channels that get guidance (original DiT: 3); None = all.
        val_trajectories: extra trajectories for validation (block and output MSE).
        shuffle: shuffle items across trajectories and timesteps each epoch (seeded).
        seed: seed of labels, noise and shuffling.
        cache_dir: optional folder to cache generated trajectories (safetensors, keyed by the
            teacher's weights, these settings and the trajectory indices).
        eval_samples: images generated by ``test`` / ``predict`` (balanced over ``num_classes``; a
            text model's sample ``i`` uses prompt ``i mod N`` of ``prompt_embeds``).
        eval_batch_size: samples per ``test`` / ``predict`` step.
        eval_seed: seed of the evaluation noise (sample ``i`` uses ``eval_seed * 10^7 + i``).
        eval_sampler: sampler of ``test`` / ``predict``; default: ``sampler``.
        eval_num_steps: sampling steps of ``test`` / ``predict``; default: ``num_steps``.
        eval_guidance_scale: guidance of ``test`` / ``predict`` (DiT's FID protocol: 1.5);
            default: ``guidance_scale``.
    """

    def __init__(
        self,
        num_trajectories: int = 16,
        classes_per_trajectory: int = 4,
        batch_size: int = 4,
        num_classes: int | None = None,
        prompt_embeds: str | None = None,
        prompts: str | None = None,
        text_encoder: str | None = None,
        negative_prompt: str = "",
        sampler: Literal["ddpm", "ddim"] | None = None,
        num_steps: int = 50,
        guidance_scale: float = 4.0,
        guided_channels: int | None = None,
        val_trajectories: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        cache_dir: str | None = None,
        eval_samples: int = 100,
        eval_batch_size: int = 50,
        eval_seed: int = 0,
        eval_sampler: Literal["ddpm", "ddim"] | None = None,
        eval_num_steps: int | None = None,
        eval_guidance_scale: float | None = None,
    ) -> None:
        super().__init__()
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        if classes_per_trajectory < 1 or batch_size < 1:
            raise ValueError("classes_per_trajectory and batch_size must be >= 1")
        if val_trajectories < 0:
            raise ValueError(f"val_trajectories must be >= 0, got {val_trajectories}")
        if eval_samples < 1 or eval_batch_size < 1:
            raise ValueError(f"eval_samples and eval_batch_size must be >= 1, got {eval_samples}, {eval_batch_size}")
        if cache_dir is not None:
            check_writable_dir(cache_dir, "cache_dir")
        # checked now, before any work; against the model in setup, before the trajectories
        self.prompts = self.prompts_digest = self.prompt_classes = None
        self.embeds_file = prompt_embeds
        if prompt_embeds and prompts:
            raise ValueError(f"give the calibration prompts once: --data.prompt_embeds {prompt_embeds} or "
                             f"--data.prompts {prompts}, not both")
        if prompt_embeds:
            self._load_prompts(prompt_embeds)
        elif prompts:
            read_prompts(prompts)  # readable, not empty
        self.save_hyperparameters()
        self.sampler_config = SamplerConfig(
            sampler=sampler or "ddpm", num_steps=num_steps, guidance_scale=guidance_scale, guided_channels=guided_channels
        )
        self.eval_sampler_config = SamplerConfig(  # invalid evaluation settings fail now, not after calibration
            sampler=eval_sampler or sampler or "ddpm",
            num_steps=eval_num_steps or num_steps,
            guidance_scale=guidance_scale if eval_guidance_scale is None else eval_guidance_scale,
            guided_channels=guided_channels,
        )
        self.train_items: dict[str, torch.Tensor] | None = None
        self.val_items: dict[str, torch.Tensor] | None = None
        self._num_classes: int | None = None

    def _load_prompts(self, path: str) -> None:
        self.prompts, self.prompts_digest, self.prompt_classes = load_prompt_embeds(path), file_digest(path), prompt_classes(path)
        self.embeds_file = path

    def _encode_prompts(self, model_source: str | None) -> None:
        """Encode ``prompts`` with the text encoder (once: a cached file) and load them."""
        hp = self.hparams
        encoder = hp.text_encoder or model_source
        if not encoder:
            raise ValueError("--data.prompts needs --data.text_encoder (a pipeline folder or hub id with text_encoder/)")
        cache = Path(hp.cache_dir or os.environ.get("VQ4DIT_CACHE", Path.home() / ".cache" / "vq4dit"))
        key = hashlib.sha256(f"{file_digest(hp.prompts)}|{hp.negative_prompt}|{encoder}".encode()).hexdigest()[:24]
        out = cache / "prompt_embeds" / f"{Path(hp.prompts).stem}-{key}.safetensors"
        encode_file(encoder, hp.prompts, out, hp.negative_prompt, progress=self.trainer is None or self.trainer.is_global_zero)
        self._load_prompts(str(out))

    def settings(self) -> DataSettings:
        """What the LightningModule needs to know of the data (asked once, in its ``setup``)."""
        hp = self.hparams
        return DataSettings(hp.guidance_scale, self.eval_sampler_config, hp.eval_samples, self.train_items,
                            self.prompts, self.prompt_classes)

    # ------------------------------------------------------------------------------- generation
    def num_classes_of(self, teacher) -> int:
        """``num_classes``, checked against the teacher's label table (default: the table size)."""
        table = teacher.config.num_embeds_ada_norm
        if self.hparams.num_classes is None:
            return table
        if not 1 <= self.hparams.num_classes <= table:
            raise ValueError(f"num_classes must be in [1, {table}] for this model, got {self.hparams.num_classes}")
        return self.hparams.num_classes

    def trajectory_plan(self, teacher) -> TrajectoryPlan:
        """The trajectories' plan; the teacher samples as the run computes: under bf16 (fp16) autocast
        with ``trainer.precision`` bf16-mixed (16-mixed), in float32 otherwise."""
        hp = self.hparams
        precision = str(getattr(self.trainer, "precision", "32-true"))
        autocast = {"bf16-mixed": "bfloat16", "16-mixed": "float16"}.get(precision)
        if self.prompts is not None:  # N prompts, cycled
            count = self.prompts["prompt_embeds"].shape[0]
            return TrajectoryPlan(hp.seed, hp.classes_per_trajectory, count, self.sampler_config, self.prompts_digest,
                                  autocast)
        return TrajectoryPlan(hp.seed, hp.classes_per_trajectory, self.num_classes_of(teacher), self.sampler_config,
                              autocast=autocast)

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        family_of(module.teacher).check_sampler_flags(sampler=self.hparams.sampler,
                                                      eval_sampler=self.hparams.eval_sampler)
        if self.prompts is None and self.hparams.prompts:
            check_encodable(module.teacher)
            self._encode_prompts(getattr(module, "settings", {}).get("model"))
        check_prompts_fit(module.teacher, self.prompts, self.embeds_file)
        # test / predict: sample i has label i mod num_classes, a class or (text models) a prompt index
        self._num_classes = (self.prompts["prompt_embeds"].shape[0] if self.prompts is not None
                             else self.num_classes_of(module.teacher))
        if stage not in ("fit", "validate"):
            return  # test / predict sample from the evaluation plan, no trajectories needed
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if module.shards_data else (0, 1)
        total = self.hparams.num_trajectories
        if total % world:
            raise ValueError(
                f"num_trajectories={total} must be divisible by the number of processes ({world}) "
                "so every rank gets the same number of distinct trajectories"
            )
        # Lightning moves the module to its device only after setup and configure_model: sample on
        # the accelerator now (DiT-XL/2 trajectories: minutes on a GPU, days on a CPU).
        teacher = module.trajectory_teacher(self.trainer.strategy.root_device)
        plan, progress = self.trajectory_plan(teacher), self.trainer.global_rank == 0
        if stage == "fit" and self.train_items is None:
            indices = list(range(rank, total, world))
            self.train_items = cached_items(teacher, indices, plan, self.hparams.cache_dir, progress=progress,
                                            prompts=self.prompts)
        if self.val_items is None and self.hparams.val_trajectories:
            indices = list(range(total, total + self.hparams.val_trajectories))
            self.val_items = cached_items(teacher, indices, plan, self.hparams.cache_dir, progress=progress,
                                          prompts=self.prompts)

    # ------------------------------------------------------------------------------ dataloaders
    def _loader(self, items, shuffle: bool, fixed: bool = False) -> DataLoader:
        epoch_fn = lambda: self.trainer.current_epoch if self.trainer is not None else 0  # noqa: E731
        dataset = ShuffledBatches(items, self.hparams.batch_size, self.hparams.seed, shuffle, epoch_fn, fixed)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        """The training batches; the same batches every epoch (in a new order) when the module asks
        for ``fixed_batches`` (recorded window inputs)."""
        module = self.trainer.lightning_module if self.trainer is not None else None
        return self._loader(self.train_items, self.hparams.shuffle, bool(getattr(module, "fixed_batches", False)))

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_items, False) if self.val_items is not None else []

    def _eval_loader(self) -> DataLoader:
        labels, seeds = evaluation_plan(self.hparams.eval_samples, self._num_classes, self.hparams.eval_seed)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        dataset = EvaluationBatches(labels, seeds, self.hparams.eval_batch_size, rank, world)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()
