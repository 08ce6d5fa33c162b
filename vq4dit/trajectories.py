"""Zero-data calibration items: the FP teacher's own sampling trajectories.

No dataset: every trajectory starts from Gaussian noise with random class labels (or, for a
text-conditioned model, prompts of an embeddings file, cycled) and is sampled by the
full-precision teacher with its family's sampler (DDPM with learned variance or DDIM; SD3: flow
matching, :mod:`vq4dit.flow_matching`, with float timesteps), with classifier-free guidance, in its
own input space. Every intermediate ``(x_t, t, y)`` (text: ``(x_t, t, prompt_index)``, the prompt
table kept once) becomes one calibration item; the student and the teacher both see the teacher's
``x_t`` (never the student's own trajectory). A trajectory is identified by its plan (labels or
prompts and noise seeds, a pure function of ``(seed, index)``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.data import IterableDataset

from .atomic import atomic_path
from .families import conditioning_of, family_of
from .families.guidance import sample_conditioned
from .prompts import prompt_condition
from .sampling import SamplerConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrajectoryPlan:
    """What a set of calibration trajectories is made of (everything but the teacher).

    Args:
        seed: seed of labels and noise.
        classes_per_trajectory: samples (random classes) per trajectory; the official code uses 4.
        num_classes: labels are drawn from ``0 .. num_classes-1``; with prompts: their number N.
        sampler: the sampling schedule (sampler, steps, guidance).
        prompts_digest: the sha256 of the prompt-embeddings file (text models; None: class labels):
            sample ``c`` of trajectory ``i`` uses prompt ``(i * classes_per_trajectory + c) % N``.
        autocast: the dtype the teacher samples in under ``torch.autocast`` (``bfloat16``,
            ``float16``; None: float32), as the run computes (``trainer.precision`` bf16-mixed, 16-mixed).
    """

    seed: int
    classes_per_trajectory: int
    num_classes: int
    sampler: SamplerConfig
    prompts_digest: str | None = None
    autocast: str | None = None

    def labels_and_seeds(self, index: int) -> tuple[list[int], list[int]]:
        """Labels (prompt indices for text) and noise seeds of trajectory ``index``."""
        labels, seeds = trajectory_plan(index, self.seed, self.classes_per_trajectory, self.num_classes)
        if self.prompts_digest is not None:  # every prompt in turn: N prompts cycled over the trajectories
            first = index * self.classes_per_trajectory
            labels = [(first + c) % self.num_classes for c in range(self.classes_per_trajectory)]
        return labels, seeds


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
    plan: TrajectoryPlan,
    samples_per_call: int = 32,
    progress: bool = True,
    prompts: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Sample the trajectories ``indices`` with the teacher; return every step as an item.

    Returns ``{"x": [M, C, H, W], "t": [M], "y": [M]}`` on the CPU, M = len(indices) * classes * steps;
    with ``prompts`` (:func:`vq4dit.prompts.load_prompt_embeds`, for a plan with a digest) ``y`` is
    ``prompt_index [M]`` and the prompt table and negative prompt come along once.
    """
    from tqdm.auto import tqdm

    family = family_of(teacher)
    labels, seeds = [], []
    for index in indices:
        traj_labels, traj_seeds = plan.labels_and_seeds(index)
        labels += traj_labels
        seeds += traj_seeds
    xs, ts, ys = [], [], []
    starts = range(0, len(labels), samples_per_call)
    device = next(teacher.parameters()).device.type
    for start in tqdm(starts, desc="teacher trajectories", disable=not progress, unit="batch"):
        batch_labels = torch.tensor(labels[start : start + samples_per_call])
        condition = batch_labels if prompts is None else prompt_condition(prompts, batch_labels)
        with torch.autocast(device, getattr(torch, plan.autocast)) if plan.autocast else contextlib.nullcontext():
            _, trajectory = sample_conditioned(family, teacher, condition, seeds[start : start + samples_per_call],
                                               plan.sampler, record_trajectory=True)
        for x_t, t in trajectory:
            xs.append(x_t.float())
            ts.append(t)
            ys.append(batch_labels)
    items = {"x": torch.cat(xs), "t": torch.cat(ts), _condition_key(prompts): torch.cat(ys)}
    return with_prompts(items, prompts)


def _condition_key(prompts: dict | None) -> str:
    return "y" if prompts is None else "prompt_index"


def with_prompts(items: dict[str, torch.Tensor], prompts: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    """``items`` with the prompt table and the negative prompt (held once, not per item) added."""
    return items if prompts is None else {**items, **prompts}


def weights_fingerprint(model: torch.nn.Module) -> str:
    """A sha256 over the names, dtypes, shapes and bytes of every parameter and buffer: two
    models with one different weight never share trajectory caches."""
    digest = hashlib.sha256()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        data = tensor.detach().contiguous().cpu()
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def cached_items(
    teacher: torch.nn.Module,
    indices: list[int],
    plan: TrajectoryPlan,
    cache_dir: str | None,
    fingerprint: Callable[[], str] | None = None,
    progress: bool = True,
    prompts: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`generate_items`, read from / written to ``cache_dir`` when given (safetensors, keyed
    by the teacher's weights, the plan (with the prompt file's digest) and the indices; the prompt
    table is not stored). A corrupt cache file is named in a warning and generated again; a cache
    that cannot be written is a ``WriteError`` (``ValueError``)."""
    if not cache_dir:
        return generate_items(teacher, indices, plan, progress=progress, prompts=prompts)
    weights = fingerprint() if fingerprint is not None else weights_fingerprint(teacher)
    record = {k: v for k, v in asdict(plan).items() if k not in ("prompts_digest", "autocast") or v is not None}  # as before
    key = json.dumps({"weights": weights, "plan": record, "indices": indices}, sort_keys=True, default=str)
    path = Path(cache_dir) / f"trajectories-{hashlib.sha256(key.encode()).hexdigest()[:16]}.safetensors"
    if path.exists():
        try:
            items = load_file(str(path))
            expected = len(indices) * plan.classes_per_trajectory * plan.sampler.num_steps
            problem = _cache_problem(items, expected, _condition_key(prompts))
            if problem is None:
                return with_prompts(items, prompts)
            log.warning("trajectory cache %s %s: generating the trajectories again", path, problem)
        except (OSError, SafetensorError, ValueError) as error:
            log.warning("trajectory cache %s is unreadable (%s): generating the trajectories again", path, error)
    items = generate_items(teacher, indices, plan, progress=progress, prompts=prompts)
    stored = {k: items[k].contiguous() for k in ("x", "t", _condition_key(prompts))}
    size = sum(v.numel() * v.element_size() for v in stored.values()) + 4096
    with atomic_path(path, size=size) as tmp:  # WriteError (a ValueError) names the file and the cause
        save_file(stored, str(tmp))
    return items


def _cache_problem(items: dict[str, torch.Tensor], expected: int, condition: str = "y") -> str | None:
    """What is wrong with a cache file's content (None: nothing): keys, item count, shapes, values."""
    if set(items) != {"x", "t", condition}:
        return f"holds {sorted(items)}, not x/t/{condition}"
    x, t, y = items["x"], items["t"], items[condition]
    if x.ndim != 4 or t.shape != (expected,) or y.shape != (expected,) or x.shape[0] != expected:
        return (f"holds x {tuple(x.shape)}, t {tuple(t.shape)}, {condition} {tuple(y.shape)}, not the {expected} "
                "items of its plan")
    if not bool(torch.isfinite(x).all()):
        return "holds NaN/Inf"
    return None


class ShuffledBatches(IterableDataset):
    """Yields batches of this rank's items (``(x, t, y)``; text items: dicts with the negative
    prompt, :mod:`vq4dit.families.conditioning`) in an order seeded by (seed, epoch).

    ``fixed``: the items are grouped into batches once (seeded by ``seed``) and only the batches'
    order changes with the epoch: every epoch yields the same batches (recorded window inputs find
    them again, :mod:`vq4dit.engine.window_inputs`).

    An ``IterableDataset`` so Lightning does not add a ``DistributedSampler`` on top of the
    per-rank sharding done at generation time.
    """

    def __init__(self, items: dict[str, torch.Tensor], batch_size: int, seed: int, shuffle: bool, epoch_fn,
                 fixed: bool = False) -> None:
        self.items, self.batch_size, self.seed, self.shuffle, self.epoch_fn = items, batch_size, seed, shuffle, epoch_fn
        self.fixed = fixed

    def __len__(self) -> int:
        return -(-self.items["t"].numel() // self.batch_size)

    def _order(self, count: int, epoch: int) -> torch.Tensor:
        if not self.shuffle:
            return torch.arange(count)
        return torch.randperm(count, generator=torch.Generator().manual_seed(self.seed + 104729 * epoch))

    def __iter__(self):
        count, conditioning = self.items["t"].numel(), conditioning_of(self.items)
        if self.fixed:  # the epoch-0 grouping, the batches in an epoch-seeded order
            groups = self._order(count, 0).split(self.batch_size)
            batches = [groups[i] for i in self._order(len(groups), self.epoch_fn() + 1)]
        else:
            batches = self._order(count, self.epoch_fn()).split(self.batch_size)
        for indices in batches:
            yield conditioning.batch(self.items, indices)


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
