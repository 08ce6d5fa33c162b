"""The shared training loop of the reference DiTs (digits, RGB patches, PixArt, MMDiT).

Everything here is dataset- and model-agnostic: an objective (:mod:`tools.training_objectives`:
improved DDPM's hybrid loss by default, rectified flow for the MMDiT), DiT's initialisation, the
warm-up + cosine learning rate, AdamW, the EMA, seeding, a progress bar, and a checkpoint of the
training itself so a killed run resumes where it stopped and ends bit-identical to an uninterrupted
one.

A per-dataset tool (``tools/train_reference.py``, ``tools/train_rgb_reference.py``,
``tools/text_reference.py``) supplies the data, an augmentation, a model builder (and a ``forward``
and an objective), and calls :func:`train_dit`.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tools.training_objectives import (  # noqa: F401  (re-exported: the tools import them here)
    DDPMObjective, FlowMatchingObjective, Objective, discretized_gaussian_log_likelihood, hybrid_loss, normal_kl,
)
from vq4dit.reference import disable_label_dropout_
from vq4dit.sampling import NULL_CLASS

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]
Build = Callable[["DiTTrainingConfig", int], nn.Module]
Forward = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]

# ---------------------------------------------------------------------------------------------
# Settings and the model
# ---------------------------------------------------------------------------------------------


@dataclass
class DiTTrainingConfig:
    """Architecture and diffusion-training settings shared by every reference DiT.

    Args:
        sample_size: image side in pixels.
        patch_size: DiT patch size.
        num_layers: transformer blocks.
        num_attention_heads: heads per block.
        attention_head_dim: width of one head (hidden = heads x head_dim).
        train_steps: optimizer steps.
        batch_size: images per step.
        lr: peak AdamW learning rate.
        min_lr: final learning rate of the cosine decay.
        warmup_steps: linear warm-up steps.
        weight_decay: AdamW weight decay.
        grad_clip: gradient-norm clip (0 = off).
        label_dropout: probability of replacing a sample's label by the null class (CFG training).
        ema_decay: EMA decay of the shipped weights.
        ema_start: step at which the EMA copies the weights and starts averaging.
        label_init_std: std of the initial label tables. DiT uses 0.02; in a 1200-step run such a
            table stays ~20x smaller than the timestep embedding and the model ignores the labels
            (class accuracy of samples 19% without CFG), hence nn.Embedding's 1.0 here.
        num_timesteps: diffusion steps of the linear schedule.
        seed: seed of initialisation, batches, noise and timesteps.
    """

    sample_size: int = 16
    patch_size: int = 2
    num_layers: int = 4
    num_attention_heads: int = 4
    attention_head_dim: int = 32
    train_steps: int = 1200
    batch_size: int = 128
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    label_dropout: float = 0.1
    ema_decay: float = 0.995
    ema_start: int = 300
    label_init_std: float = 1.0
    num_timesteps: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sample_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide sample_size {self.sample_size}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {self.label_dropout}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.train_steps < 1 or self.batch_size < 1:
            raise ValueError("train_steps and batch_size must be >= 1")


@torch.no_grad()
def xavier_init_(model: nn.Module) -> nn.Module:
    """Xavier-uniform weights and zero biases for every Linear and the patch projection
    (``model.pos_embed.proj``), in place: the common start of DiT's and PixArt's initialisations."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
    return model


def spread(values: list[float]) -> dict[str, float]:
    """``{mean, min, max, std}`` of ``values`` (sample std; 0 for one value)."""
    mean = sum(values) / len(values)
    return {"mean": mean, "min": min(values), "max": max(values),
            "std": (sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1)) ** 0.5}


def record_noise_bars(out: Path, report: dict, keys: tuple[str, ...]) -> dict:
    """Print ``report``'s ``keys`` (each a :func:`spread`) as a markdown table and store ``report``
    as ``noise_bars`` in ``out/training.json``; returns ``report``."""
    import json

    print("| metric | mean | min | max |\n|---|---|---|---|")
    for key in keys:
        if report[key]:
            print(f"| {key} | {report[key]['mean']:.4f} | {report[key]['min']:.4f} | {report[key]['max']:.4f} |")
    info_path = Path(out) / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["noise_bars"] = report
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return report


@torch.no_grad()
def init_dit_weights_(model: nn.Module, label_std: float = 0.02) -> nn.Module:
    """DiT's initialisation (from the paper's description), in place.

    Xavier-uniform Linears and patch projection with zero bias, N(0, 0.02) timestep MLPs,
    N(0, label_std) label tables, and zero adaLN-Zero modulations and output layer, so every block
    starts as the identity.
    """
    xavier_init_(model)
    for block in model.transformer_blocks:
        embedder = block.norm1.emb
        nn.init.normal_(embedder.class_embedder.embedding_table.weight, std=label_std)
        nn.init.normal_(embedder.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(embedder.timestep_embedder.linear_2.weight, std=0.02)
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build_dit(config: DiTTrainingConfig, in_channels: int = 1) -> nn.Module:
    """A freshly initialised learned-sigma class-conditional DiT (adaLN-Zero, 1000 labels + null
    class, label dropout off: the loop drops labels itself) with ``in_channels`` image channels."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=config.num_layers,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    return disable_label_dropout_(init_dit_weights_(model, config.label_init_std))


def lr_at(step: int, config: DiTTrainingConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---------------------------------------------------------------------------------------------
# Checkpoint of the training itself
# ---------------------------------------------------------------------------------------------


def _save_checkpoint(path: Path, state: dict) -> None:
    """Write ``state`` atomically (temporary file + rename): a kill leaves the previous checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    torch.save(state, partial)
    os.replace(partial, path)


def _load_checkpoint(path: Path, config: DiTTrainingConfig) -> dict | None:
    """The saved training state at ``path``, or None when there is none; refuses another config."""
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["config"] != asdict(config):
        raise ValueError(f"checkpoint {path} was written with other settings; delete it or use another path")
    return state


# ---------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------


def _no_augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return images


def dit_forward(model: nn.Module, xt: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
    """A class-conditional DiT's output ``[B, 2C, H, W]`` on ``xt [B, C, H, W]``, ``timesteps [B]``
    and ``labels [B]`` (``NULL_CLASS`` where dropped)."""
    return model(xt, timestep=timesteps, class_labels=labels).sample


def train_dit(
    config: DiTTrainingConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    augment: Augment = _no_augment,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    progress: bool = True,
    stop_at: int | None = None,
    build: Build = build_dit,
    forward: Forward = dit_forward,
    objective: Objective | None = None,
) -> tuple[nn.Module, dict]:
    """Train a reference DiT (by default with the hybrid loss); returns ``(ema_model, stats)`` (EMA in eval mode).

    Args:
        config: architecture and training settings.
        images: ``[N, C, H, W]`` in [-1, 1] (C becomes the model's ``in_channels``).
        labels: ``[N]`` class ids below 1000.
        augment: ``(images [B, C, H, W], generator) -> images``, applied to every batch.
        checkpoint: file of the training state (model, EMA, optimizer, RNGs, losses), written every
            ``checkpoint_every`` steps; an existing one with the same config is resumed.
        checkpoint_every: steps between checkpoints.
        progress: show a tqdm bar with the running losses.
        stop_at: end after this many steps (of ``config.train_steps``, whose schedule stays): a
            bounded wall time, reproducible by the same ``stop_at``; None = ``train_steps``.
        build: ``(config, in_channels) -> model``.
        forward: ``(model, x_t, timesteps, labels, generator) -> output``.
        objective: noising and loss; None = :class:`DDPMObjective` on ``config.num_timesteps``.
    """
    from tqdm import tqdm

    if images.shape[-1] != config.sample_size:
        raise ValueError(f"images are {images.shape[-1]} px, config.sample_size is {config.sample_size}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    objective = DDPMObjective(config.num_timesteps) if objective is None else objective
    model = build(config, images.shape[1]).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    history: dict[str, list[float]] = {"loss": []}
    first_step, elapsed = 0, 0.0
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    state = _load_checkpoint(checkpoint, config) if checkpoint is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        history, first_step, elapsed = state["history"], state["step"], state["elapsed"]
        if progress:
            print(f"resumed from {checkpoint} at step {first_step}", flush=True)

    last_step = config.train_steps if stop_at is None else max(1, min(stop_at, config.train_steps))
    if first_step > last_step:
        raise ValueError(f"checkpoint {checkpoint} is at step {first_step}, past stop_at={stop_at}")
    start = time.perf_counter() - elapsed
    bar = tqdm(range(first_step, last_step), disable=not progress, mininterval=5.0, desc="train DiT",
               initial=first_step, total=config.train_steps)
    for step in bar:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x0 = augment(images[index], generator)
        y = labels[index].clone()
        y[torch.rand(config.batch_size, generator=generator) < config.label_dropout] = NULL_CLASS
        xt, timesteps, noise_state = objective.noisy(x0, generator)

        output = forward(model, xt, timesteps, y, generator)
        terms = objective.losses(output, x0, xt, noise_state)
        loss = sum(terms.values()).mean()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

        with torch.no_grad():
            if step + 1 == config.ema_start or (step + 1 < config.ema_start and step + 1 == config.train_steps):
                ema.load_state_dict(model.state_dict())
            elif step + 1 > config.ema_start:
                for ema_p, p in zip(ema.parameters(), model.parameters()):
                    ema_p.lerp_(p, 1.0 - config.ema_decay)

        history["loss"].append(loss.item())
        for name, term in terms.items():
            history.setdefault(name, []).append(term.mean().item())
        if step % 50 == 0 or step + 1 == config.train_steps:
            recent = {k: sum(v[-50:]) / len(v[-50:]) for k, v in history.items()}
            bar.set_postfix({k: f"{v:.4f}" for k, v in recent.items()})
        if progress and (step % 500 == 0 or step + 1 == config.train_steps):
            recent = {k: sum(v[-100:]) / len(v[-100:]) for k, v in history.items()}
            print(
                f"step {step + 1}/{config.train_steps} lr {lr_at(step, config):.2e} "
                + " ".join(f"{k} {v:.4f}" for k, v in recent.items()),
                flush=True,
            )
        if checkpoint is not None and ((step + 1) % checkpoint_every == 0 or step + 1 == last_step):
            _save_checkpoint(checkpoint, {
                "config": asdict(config), "step": step + 1, "elapsed": time.perf_counter() - start,
                "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
            })

    if last_step < config.ema_start:  # stopped before the EMA started: ship the weights themselves
        ema.load_state_dict(model.state_dict())
    window = min(100, last_step)
    stats = {
        "steps_done": last_step,
        "wall_seconds": time.perf_counter() - start,
        "final_loss": sum(history["loss"][-window:]) / window,
        **{f"final_{k}": sum(v[-window:]) / window for k, v in history.items() if k != "loss"},
        "loss_curve": [round(sum(history["loss"][i : i + 100]) / len(history["loss"][i : i + 100]), 5)
                       for i in range(0, last_step, 100)],
        "num_parameters": sum(p.numel() for p in ema.parameters()),
    }
    return ema, stats
