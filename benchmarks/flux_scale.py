"""FLUX.1-dev at real size: calibration memory per block, packed size, inference memory, projected H100 time.

FLUX.1-dev (``FluxTransformer2DModel``: 19 double blocks, then 38 single blocks, 3072 wide, 11.9 B, guidance
embedded) at 1024 px: 4096 image tokens (128 x 128 latents of 16 channels packed 2 x 2) and 512 T5 text tokens
(the dev pipeline's ``max_sequence_length``). :mod:`benchmarks.mmdit_scale`'s method with the Flux family: the
whole model on the meta device only (parameter count, packed size), ONE real double block and ONE real single
block at a time on the CPU (a 1-block model each, random weights), built with the default recipe and run for one
all-soft calibration step under CPU bf16 autocast at 1 and 2 prompts, extrapolated to 4. Flux has no
unconditional branch: the model batch is the prompts, no negative copies (the guidance scale is an input).
The whole model: 19 x the double block + 38 x the single block. Added here: the block-by-block window of K blocks
(not built in vq4dit yet), projected peak = bf16 teacher + K x (held + saved) of the larger (double) block: an
upper bound (the held part counts the window's teacher blocks a second time); with the teacher offloaded to the
CPU, K x (held + saved).

PROJECTIONS, NOT MEASUREMENTS, wherever a column says H100 (no GPU was used).

    python -m benchmarks.mmdit_scale --models flux-dev              # w2 and w3 (1 thread)
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from diffusers import FluxTransformer2DModel

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.mmdit_scale import forward_peak, inference_rows, kmeans_counts, parameters, trajectory_time
from benchmarks.pixart_scale import GB, held_bytes, hidden, kind_rows, measure_block, packed_report, paper_batch
from benchmarks.roofline import combine
from vq4dit.families import FLUX

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))  # the FLUX.1-dev hub config's values
SIDE = 128  # FluxPipeline's default_sample_size: 1024 px
TEXT_TOKENS = 512  # T5 tokens: the FLUX.1-dev pipeline's max_sequence_length (schnell: 256)
GUIDANCE = 3.5  # FluxPipeline's default for dev (an input: its value changes no cost)
RUN = (64, 4, 28)  # configs/flux_dev.yaml: trajectories, prompts per trajectory, steps
WINDOWS = (1, 2, 4, 8)


def one_block_double(config: dict) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` of ``config`` with one double block and no single block (random weights)."""
    return FluxTransformer2DModel(**{**config, "num_layers": 1, "num_single_layers": 0})


def one_block_single(config: dict) -> FluxTransformer2DModel:
    """A ``FluxTransformer2DModel`` of ``config`` with no double block and one single block (random weights)."""
    return FluxTransformer2DModel(**{**config, "num_layers": 0, "num_single_layers": 1})


def flux_items(config: dict, count: int, text_tokens: int, seed: int = 0, side: int = SIDE) -> dict[str, torch.Tensor]:
    """``count`` random calibration items (``x [count, in_channels / 4, side, side]``, float ``t``,
    ``prompt_index``) with a table of ``count`` prompts: ``prompt_embeds`` of ``text_tokens``, ones as the
    mask, ``pooled_prompt_embeds`` (no negative prompt)."""
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(count, config["in_channels"] // 4, side, side, generator=g),
        "t": torch.rand(count, generator=g) * 1000, "prompt_index": torch.arange(count),
        "prompt_embeds": torch.randn(count, text_tokens, config["joint_attention_dim"], generator=g),
        "prompt_attention_mask": torch.ones(count, text_tokens, dtype=torch.long),
        "pooled_prompt_embeds": torch.randn(count, config["pooled_projection_dim"], generator=g),
    }


def flux_forwards(config: dict, text_tokens: int, side: int) -> tuple[int, dict[str, Any]]:
    """``(activation peak bytes, {kind: op counts})`` of bf16 1-block forwards at 1 prompt (the larger peak of
    the two kinds: blocks run one after another)."""
    peaks, counts = [], {}
    for kind, build in (("double", one_block_double), ("single", one_block_single)):
        torch.manual_seed(0)
        items = flux_items(config, 1, text_tokens, side=side)
        batch = FLUX.conditioning.guided(FLUX.conditioning.batch(items, torch.arange(1)), GUIDANCE)
        peak, counts[kind] = forward_peak(build(config), batch, FLUX)
        peaks.append(peak)
    return max(peaks), counts


def window_rows(config: dict, kinds: dict[str, tuple[dict[str, Any], int]],
                windows: tuple[int, ...] = WINDOWS) -> dict[str, tuple[str, ...]]:
    """Per window of K blocks (block-by-block calibration, not built): per kind K x (held + saved), and for the
    model the bf16 teacher + K x the larger kind's (held + saved) (teacher offloaded: without it)."""
    teacher = 2 * parameters(config, FLUX)
    per = [held_bytes(m) + m["saved"] for m, _ in kinds.values()]
    return {f"**window of {k} blocks: bf16 teacher + {k} x (held + saved), GB (projected)**": (
        *(f"{k * p / GB:.1f}" for p in per),
        f"**{(teacher + k * max(per)) / GB:.1f}** (teacher offloaded: {k * max(per) / GB:.1f})") for k in windows}


def flux_columns(config: dict, run: tuple[int, int, int], bits: tuple[int, ...], items: tuple[int, int],
                 kmeans_iters: int, started: Timer, text_tokens: int = TEXT_TOKENS,
                 side: int = SIDE) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{column: {quantity: (double block, single block, whole model)}}`` of a FLUX.1 model, a column per bit
    width; ``run``: the config's trajectories, prompts per trajectory and steps; latents ``side`` square."""
    image = (side // 2) ** 2
    activations, forwards = flux_forwards(config, text_tokens, side)
    builds = {"double": (one_block_double, config["num_layers"]), "single": (one_block_single, config["num_single_layers"])}
    model_forward = combine([(count, forwards[kind]) for kind, (_, count) in builds.items()])
    make = partial(flux_items, side=side)
    input_bytes = (image + text_tokens + 1) * hidden(config) * 2  # hidden + text states, temb [hidden], bf16
    host_bytes = config["in_channels"] // 4 * side ** 2 * 4 + 2 * 8
    columns = {}
    for b in bits:
        kinds = {kind: (paper_batch(measure_block(config, b, items, text_tokens, kmeans_iters=kmeans_iters, family=FLUX,
                                                  build=build, make_items=make, output_tokens=image + text_tokens)), count)
                 for kind, (build, count) in builds.items()}
        rows = {**kind_rows(kinds, kmeans_counts(config, b, FLUX), {b: packed_report(config, b, FLUX)}, run,
                            input_bytes, host_bytes, copies=1),
                **window_rows(config, kinds),
                **{q: ("-", *cells) for q, cells in inference_rows(config, (b,), activations, FLUX, "1").items()},
                **{q: ("-", *cells) for q, cells in trajectory_time(model_forward, run).items()}}
        columns[f"w{b}"] = {q.replace(f" w{b}", ""): cells for q, cells in rows.items()}
        print(f"measured: FLUX.1 {hidden(config)} wide, w{b} ({started.elapsed:.0f} s)", flush=True)
    return columns


def flux_table(columns: dict[str, dict[str, tuple[str, ...]]], items: tuple[int, int], config: dict = FLUX_DEV,
               text_tokens: int = TEXT_TOKENS, side: int = SIDE) -> str:
    """The caption and markdown table: a row per quantity, per column its double, single and model cells."""
    double, single = config["num_layers"], config["num_single_layers"]
    caption = (f"FLUX.1-dev ({double} double + {single} single blocks, {hidden(config)} wide, "
               f"{parameters(config, FLUX) / 1e9:.1f} B; 1024 px: {(side // 2) ** 2} image + {text_tokens} text "
               f"tokens), default recipe, bf16-mixed, bf16 teacher, all soft (first step), batch 4, no negative copies "
               f"(extrapolated from {' and '.join(map(str, items))}); {machine_line(label='measured on')}")
    names = list(next(iter(columns.values())))
    header = ["quantity"] + [f"{c} {part}" for c in columns
                             for part in ("double block", "single block", f"model ({double} + {single} blocks)")]
    return caption + "\n\n" + markdown_table(header, [[q, *(cell for c in columns.values() for cell in c[q])] for q in names])
