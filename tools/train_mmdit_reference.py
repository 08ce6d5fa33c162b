"""Training of the shipped MMDiT reference and its text path (see :mod:`vq4dit.mmdit_reference`).

``python tools/train_mmdit_reference.py train`` trains a tiny ``SD3Transformer2DModel`` and its
mean-pooled word-level text encoder together on the shared loop (:mod:`tools.diffusion_training`
with its rectified-flow objective: warm-up + cosine lr, AdamW, EMA, resumable ``--checkpoint``) on
the digits with the PixArt reference's captions (the empty prompt with probability
``label_dropout``), then writes ``vq4dit/assets/mmdit_reference/`` (FP16 transformer, text encoder,
scheduler config, the calibration prompts and their embeddings, ``training.json``). FP quality,
FP-against-FP noise bars and ``samples_fp.png``: ``python tools/train_mmdit_reference.py evaluate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

if __package__ in (None, ""):  # run as `python tools/NAME.py`: the repository root on the path, for tools.*
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.diffusion_training import DiTTrainingConfig, FlowMatchingObjective, xavier_init_
from tools.text_reference import evaluate_text_reference, train_text_reference
from vq4dit.mmdit_reference import MMDIT_ASSETS_DIR, MMDIT_SHIFT, JointTextDiT, new_pooled_text_encoder


@dataclass
class MMDiTReferenceConfig(DiTTrainingConfig):
    """The MMDiT reference: 4 joint blocks x 128 (4 heads x 32) like the PixArt reference, text
    tokens of ``caption_channels`` projected to ``caption_projection_dim``, qk RMSNorm; random shift
    augmentation of ``max_shift`` px; rectified flow with ``timestep_sampling`` (SD3: logit-normal).
    ``num_timesteps`` is the timestep scale (the model sees ``s * 1000``). 1600 steps: what one
    thread of a 2-core machine shared with other jobs did in about 40 min (1.5 s a step; the
    pooled text embedding modulates every block, as a label table does)."""

    train_steps: int = 1600
    caption_channels: int = 32
    caption_projection_dim: int = 128
    qk_norm: str = "rms_norm"
    max_shift: int = 1
    timestep_sampling: str = "logit_normal"


@torch.no_grad()
def init_mmdit_weights_(model: nn.Module) -> nn.Module:
    """DiT's adaLN-Zero initialisation carried to the joint blocks, in place: Xavier-uniform Linears
    and patch projection with zero bias, N(0, 0.02) timestep MLP, zero modulation Linears of both
    streams (every block starts as the identity) and zero output layer."""
    xavier_init_(model)
    embedder = model.time_text_embed.timestep_embedder
    for layer in (embedder.linear_1, embedder.linear_2):
        nn.init.normal_(layer.weight, std=0.02)
    for block in model.transformer_blocks:
        for norm in (block.norm1, block.norm1_context):
            nn.init.zeros_(norm.linear.weight)
            nn.init.zeros_(norm.linear.bias)
    for layer in (model.norm_out.linear, model.proj_out):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return model


def build_joint_dit(config: MMDiTReferenceConfig, in_channels: int) -> JointTextDiT:
    """A freshly initialised SD3 transformer (velocity output, ``in_channels`` channels) and pooled
    text encoder (``caption_channels`` wide)."""
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel(
        sample_size=config.sample_size, patch_size=config.patch_size, in_channels=in_channels,
        out_channels=in_channels, num_layers=config.num_layers, attention_head_dim=config.attention_head_dim,
        num_attention_heads=config.num_attention_heads, joint_attention_dim=config.caption_channels,
        caption_projection_dim=config.caption_projection_dim, pooled_projection_dim=config.caption_channels,
        pos_embed_max_size=config.sample_size // config.patch_size, qk_norm=config.qk_norm,
    )
    return JointTextDiT(init_mmdit_weights_(transformer), new_pooled_text_encoder(config.caption_channels))


def write_scheduler(out: Path, config: MMDiTReferenceConfig) -> None:
    """``scheduler/scheduler_config.json``: a ``FlowMatchEulerDiscreteScheduler`` with shift
    :data:`~vq4dit.mmdit_reference.MMDIT_SHIFT` (what the SD3 family samples with)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    FlowMatchEulerDiscreteScheduler(num_train_timesteps=config.num_timesteps, shift=MMDIT_SHIFT).save_config(out / "scheduler")


def train(
    out: Path = MMDIT_ASSETS_DIR,
    dit: MMDiTReferenceConfig = MMDiTReferenceConfig(),
    checkpoint: Path = Path("mmdit_reference_training.ckpt"),
    threads: int = 1,
    stop_at: int | None = None,
) -> dict:
    """Train the MMDiT reference and its text encoder with rectified flow into ``out`` (artefact
    folder; ``dit``: the settings, ``--dit.train_steps N``: not ``config``, the command line's config-file
    option; ``checkpoint``: the training state, resumed when present; ``threads``: torch CPU threads;
    ``stop_at``: end after this many of ``dit.train_steps``), as the PixArt tool's ``train``."""
    objective = FlowMatchingObjective(dit.timestep_sampling, dit.num_timesteps)
    return train_text_reference(Path(out), dit, checkpoint, threads, stop_at, build_joint_dit, objective,
                                write_extra=lambda folder: write_scheduler(folder, dit),
                                objective_text=f"rectified flow, {dit.timestep_sampling} s, velocity MSE")


def evaluate(
    out: Path = MMDIT_ASSETS_DIR,
    seeds: tuple[int, ...] = (0, 1, 2),
    per_class: int = 16,
    num_steps: int = 25,
    guidance_scale: float = 1.0,
    threads: int = 1,
) -> dict:
    """:func:`tools.text_reference.evaluate_text_reference` of the shipped MMDiT (into its
    ``training.json``): Euler flow matching with the scheduler's shift, guidance 1.0 by default
    (prompt accuracy about 0.95, as the PixArt reference's 1.5)."""
    from vq4dit.families import family_of
    from vq4dit.mmdit_reference import load_mmdit_reference_model

    model = load_mmdit_reference_model(out)
    shift = json.loads((Path(out) / "scheduler" / "scheduler_config.json").read_text())["shift"]
    sampler = f"Euler flow matching {num_steps} steps, shift {shift:g}, cfg {guidance_scale:g} against the empty prompt"
    return evaluate_text_reference(Path(out), family_of(model), model, sampler, seeds, per_class, num_steps,
                                   guidance_scale, threads, clip_denoised=False)


def main(args: list[str] | None = None) -> None:
    """``python tools/train_mmdit_reference.py {train,evaluate} ...``."""
    from jsonargparse import auto_cli

    auto_cli({"train": train, "evaluate": evaluate}, args=args)


if __name__ == "__main__":
    main()
