"""Zero-data calibration samples: the FP teacher's own sampling trajectories.

No dataset: every trajectory starts from Gaussian noise with random class labels and is sampled
by the full-precision teacher (DDPM with learned variance or DDIM, with classifier-free guidance).
Every intermediate ``(x_t, t, y)`` becomes one calibration item; the student and the teacher both
see the teacher's ``x_t`` (never the student's own trajectory).

Trajectories are generated once, up front in ``setup``, on the trainer's device (and optionally
cached on disk as safetensors), because the teacher's sampling costs as much as one epoch of
calibration forwards and a fixed set makes shuffling, resume and DDP sharding exact. Under DDP,
rank ``r`` of ``W`` generates and uses trajectories ``r, r + W, ...``: none duplicated, none
dropped. With the module's ``spread_blocks`` (ranks split the blocks, not the data) every rank
generates and uses all of them, in the same order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, IterableDataset

from .evaluation import evaluation_plan
from .sampling import SamplerConfig, sample


def trajectory_plan(index: int, seed: int, classes_per_trajectory: int, num_classes: int) -> tuple[list[int], list[int]]:
    """Labels and noise seeds of trajectory ``index``: a pure function of (seed, index)."""
    generator = torch.Generator().manual_seed(seed * 7919 + index)
    labels = torch.randint(num_classes, (classes_per_trajectory,), generator=generator).tolist()
    seeds = [(seed * 1_000_003 + index * classes_per_trajectory + c) % (2**62) for c in range(classes_per_trajectory)]
    return labels, seeds


@torch.no_grad()
def generate_items(
    teacher: torch.nn.Module,
    indices: list[int],
    seed: int,
    classes_per_trajectory: int,
    num_classes: int,
    sampler: SamplerConfig,
    samples_per_call: int = 32,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Sample the trajectories ``indices`` with the teacher; return every step as an item.

    Returns ``{"x": [M, C, H, W], "t": [M], "y": [M]}`` on the CPU, M = len(indices) * classes * steps.
    """
    from tqdm.auto import tqdm

    labels, seeds = [], []
    for index in indices:
        traj_labels, traj_seeds = trajectory_plan(index, seed, classes_per_trajectory, num_classes)
        labels += traj_labels
        seeds += traj_seeds
    xs, ts, ys = [], [], []
    starts = range(0, len(labels), samples_per_call)
    for start in tqdm(starts, desc="teacher trajectories", disable=not progress, unit="batch"):
        batch_labels = torch.tensor(labels[start : start + samples_per_call])
        _, trajectory = sample(teacher, batch_labels, seeds[start : start + samples_per_call], sampler, record_trajectory=True)
        for x_t, t in trajectory:
            xs.append(x_t.float())
            ts.append(t)
            ys.append(batch_labels)
    return {"x": torch.cat(xs), "t": torch.cat(ts), "y": torch.cat(ys)}


class ShuffledBatches(IterableDataset):
    """Yields ``(x, t, y)`` batches of this rank's items in an order seeded by (seed, epoch).

    An ``IterableDataset`` so Lightning does not add a ``DistributedSampler`` on top of the
    per-rank sharding done at generation time.
    """

    def __init__(self, items: dict[str, torch.Tensor], batch_size: int, seed: int, shuffle: bool, epoch_fn) -> None:
        self.items, self.batch_size, self.seed, self.shuffle, self.epoch_fn = items, batch_size, seed, shuffle, epoch_fn

    def __len__(self) -> int:
        return -(-self.items["t"].numel() // self.batch_size)

    def __iter__(self):
        count = self.items["t"].numel()
        if self.shuffle:
            order = torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + 104729 * self.epoch_fn()))
        else:
            order = torch.arange(count)
        for start in range(0, count, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.items["x"][idx], self.items["t"][idx], self.items["y"][idx]


class CalibrationDataModule(pl.LightningDataModule):
    """Zero-data calibration items from the FP teacher's sampling trajectories.

    Args:
        num_trajectories: training trajectories (in all ranks together; divisible by world size,
            except with the module's ``spread_blocks``, where every rank uses all of them).
        classes_per_trajectory: samples (random classes) per trajectory; the official code uses 4.
        batch_size: items per optimisation step; each item is also fed with the null label when
            ``guidance_scale > 1``, so the model batch is twice this (official: 4 + 4).
        num_classes: labels are drawn from ``0 .. num_classes-1``; default: the model's table size.
        sampler: ``ddpm`` (original DiT, learned variance) or ``ddim``.
        num_steps: sampling steps of the schedule used at inference (default 50).
        guidance_scale: classifier-free guidance of the teacher's sampling (official code: 4.0).
        guided_channels: leading channels that get guidance (original DiT: 3); None = all.
        val_trajectories: extra trajectories for validation (block and output MSE).
        shuffle: shuffle items across trajectories and timesteps each epoch (seeded).
        seed: seed of labels, noise and shuffling.
        cache_dir: optional folder to cache generated trajectories (safetensors, keyed by a hash of
            the model source and these settings).
        eval_samples: images generated by ``test`` / ``predict`` (balanced over ``num_classes``).
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
        sampler: str = "ddpm",
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
        eval_sampler: str | None = None,
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
        self.save_hyperparameters()
        self.sampler_config = SamplerConfig(
            sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale, guided_channels=guided_channels
        )
        self.eval_sampler_config()  # invalid evaluation settings fail now, not after calibration
        self.train_items: dict[str, torch.Tensor] | None = None
        self.val_items: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------- generation
    def _num_classes(self, teacher) -> int:
        table = teacher.config.num_embeds_ada_norm
        if self.hparams.num_classes is None:
            return table
        if not 1 <= self.hparams.num_classes <= table:
            raise ValueError(f"num_classes must be in [1, {table}] for this model, got {self.hparams.num_classes}")
        return self.hparams.num_classes

    def _cache_path(self, source: str, indices: list[int]) -> Path | None:
        if not self.hparams.cache_dir:
            return None
        key = json.dumps({"source": source, "hparams": dict(self.hparams), "indices": indices}, sort_keys=True, default=str)
        return Path(self.hparams.cache_dir) / f"trajectories-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"

    def _items(self, teacher, source: str, indices: list[int], progress: bool) -> dict[str, torch.Tensor]:
        path = self._cache_path(source, indices)
        if path is not None and path.exists():
            return load_file(str(path))
        items = generate_items(
            teacher, indices, self.hparams.seed, self.hparams.classes_per_trajectory,
            self._num_classes(teacher), self.sampler_config, progress=progress,
        )
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({k: v.contiguous() for k, v in items.items()}, str(tmp))
            os.replace(tmp, path)
        return items

    def setup(self, stage: str) -> None:
        module = self.trainer.lightning_module
        teacher, source = module.teacher, str(module.hparams.get("model", ""))
        rank, world = self.trainer.global_rank, self.trainer.world_size
        if module.hparams.get("spread_blocks", False):
            rank, world = 0, 1  # every rank calibrates its blocks on all items, as one process would
        total = self.hparams.num_trajectories
        if stage not in ("fit", "validate"):
            return  # test / predict sample from the evaluation plan, no trajectories needed
        if total % world:
            raise ValueError(
                f"num_trajectories={total} must be divisible by the number of processes ({world}) "
                "so every rank gets the same number of distinct trajectories"
            )
        progress = self.trainer.global_rank == 0
        # Lightning moves the module to its device only after setup and configure_model: sample on
        # the accelerator now (DiT-XL/2 trajectories: minutes on a GPU, days on a CPU), and the
        # student is then built and k-means initialised there too.
        teacher.to(self.trainer.strategy.root_device)
        if stage == "fit" and self.train_items is None:
            self.train_items = self._items(teacher, source, list(range(rank, total, world)), progress)
        if stage in ("fit", "validate") and self.val_items is None and self.hparams.val_trajectories:
            val = list(range(total, total + self.hparams.val_trajectories))
            self.val_items = self._items(teacher, source, val, progress)

    # ------------------------------------------------------------------------------ dataloaders
    def _loader(self, items, shuffle: bool) -> DataLoader:
        epoch_fn = lambda: self.trainer.current_epoch if self.trainer is not None else 0
        dataset = ShuffledBatches(items, self.hparams.batch_size, self.hparams.seed, shuffle, epoch_fn)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_items, self.hparams.shuffle)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_items, False) if self.val_items is not None else []

    # ------------------------------------------------------------------------------ evaluation
    def eval_sampler_config(self) -> SamplerConfig:
        """Sampler of ``test`` / ``predict``: the calibration sampler with the ``eval_*`` overrides."""
        hp = self.hparams
        return SamplerConfig(
            sampler=hp.eval_sampler or hp.sampler,
            num_steps=hp.eval_num_steps or hp.num_steps,
            guidance_scale=hp.guidance_scale if hp.eval_guidance_scale is None else hp.eval_guidance_scale,
            guided_channels=hp.guided_channels,
        )

    def _eval_loader(self) -> DataLoader:
        teacher = self.trainer.lightning_module.teacher
        labels, seeds = evaluation_plan(self.hparams.eval_samples, self._num_classes(teacher), self.hparams.eval_seed)
        rank, world = self.trainer.global_rank, self.trainer.world_size
        dataset = EvaluationBatches(labels, seeds, self.hparams.eval_batch_size, rank, world)
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader()

    def predict_dataloader(self) -> DataLoader:
        return self._eval_loader()


class EvaluationBatches(IterableDataset):
    """This rank's share (samples ``rank, rank + world, ...``) of the evaluation plan, in batches of
    ``{"index": [B], "labels": [B], "seeds": [B]}``: no sample duplicated or dropped under DDP."""

    def __init__(self, labels: torch.Tensor, seeds: list[int], batch_size: int, rank: int = 0, world: int = 1) -> None:
        self.index = torch.arange(rank, len(seeds), world)
        self.labels, self.seeds, self.batch_size = labels, torch.tensor(seeds, dtype=torch.long), batch_size

    def __len__(self) -> int:
        return -(-len(self.index) // self.batch_size)

    def __iter__(self):
        for chunk in self.index.split(self.batch_size):
            yield {"index": chunk, "labels": self.labels[chunk], "seeds": self.seeds[chunk]}
