"""SD3.5 at real size: calibration memory per block, packed size, inference memory, projected H100 time.

SD3.5-Large (38 joint blocks, 2432 wide, 8.1 B) and SD3.5-Medium (24 joint blocks, 1536 wide, ``attn2`` in
blocks 0-12, 2.5 B) at 1024 px: 4096 image tokens and 333 text tokens (77 CLIP + 256 T5, as ``python -m
vq4dit.prompts encode`` writes them). The method is :mod:`benchmarks.pixart_scale`'s (its functions, with the
SD3 family): the whole model on the meta device only (parameter counts, packed size), ONE real joint block
at a time on the CPU (a full block with its text stream, not the last ``context_pre_only`` one; Medium: a
block with ``attn2``, so 24 x it is an upper bound) built with the default recipe and run for one all-soft
calibration step under CPU bf16 autocast at 1 + 1 and 2 + 2 prompts, extrapolated to 4 + 4. Added here:

- inference memory of the packed model: its packed bytes plus the activation peak of a 1024 px forward at
  1 image + its negative copy (the pipeline's CFG batch), bf16, no grad, measured as the rise of the process's
  peak RSS over a 1-block model's forward (blocks run one after another: one block's transients at a time);
- the teacher trajectories' time: a counted bf16 forward of the block at 1 + 1, times blocks, prompts,
  steps and trajectories of the config.

PROJECTIONS, NOT MEASUREMENTS, wherever a column says H100 (no GPU was used).

    python -m benchmarks.mmdit_scale                      # Large and Medium, w2 and w3 (1 thread)
    python -m benchmarks.mmdit_scale --models medium --bits 2
    python -m benchmarks.mmdit_scale --models flux-dev              # FLUX.1-dev: benchmarks/flux_scale.py
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.pixart_scale import (
    GB, hidden, measure_block, packed_report, paper_batch, parse_measure_arguments, scale_rows, tokens,
)
from benchmarks.proc_memory import status_kb
from benchmarks.projection import bf16_autocast
from benchmarks.projection_kmeans import measure_kmeans, project_kmeans
from benchmarks.recipe_configs import recipe_settings
from benchmarks.roofline import PROJECTION_BANNER, SCENARIOS, Counts, combine, count_ops, fmt_s
from vq4dit.families import SD3, Family

SD35 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
            joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")  # both hub configs
MODELS = {  # name -> (transformer config, configs/*.yaml run: trajectories, prompts per trajectory, steps)
    "large": ({**SD35, "num_layers": 38, "num_attention_heads": 38, "caption_projection_dim": 2432,
               "pos_embed_max_size": 192, "dual_attention_layers": ()}, (64, 4, 28)),
    "medium": ({**SD35, "num_layers": 24, "num_attention_heads": 24, "caption_projection_dim": 1536,
                "pos_embed_max_size": 384, "dual_attention_layers": tuple(range(13))}, (64, 4, 40)),
}
TEXT_TOKENS = 77 + 256  # CLIP-L/G's 77 then T5's 256: StableDiffusion3Pipeline's prompt_embeds


def parameters(config: dict, family: Family = SD3) -> int:
    """The parameter count of the whole model (built on meta)."""
    with torch.device("meta"):
        return sum(p.numel() for p in family.model_class(**config).parameters())


def linear_shapes(config: dict, family: Family = SD3) -> list[tuple[int, int]]:
    """``(out, in)`` of every Linear ``family`` quantizes by default in the whole model (built on meta)."""
    with torch.device("meta"):
        model = family.model_class(**config)
    return [(m.out_features, m.in_features) for n, m in model.named_modules() if family.linear_filter()(m, n)]


def kmeans_counts(config: dict, bits: int, family: Family = SD3) -> Counts:
    """The projected k-means init + error feedback (25 iterations) of every quantized Linear at ``bits``."""
    vq, _ = recipe_settings("quality", bits, kmeans_iters=25)
    return project_kmeans(measure_kmeans(vq, hidden(config), 2), hidden(config), 2, 25, linear_shapes(config, family))


def one_block_sd3(config: dict) -> SD3Transformer2DModel:
    """A 1-block ``SD3Transformer2DModel`` whose block is a full joint block (text stream out too, ``attn2``
    when ``config`` has dual attention layers): block 0 of a 2-block model, random weights."""
    model = SD3Transformer2DModel(**{**config, "num_layers": 2,
                                     "dual_attention_layers": (0,) if config["dual_attention_layers"] else ()})
    model.transformer_blocks = torch.nn.ModuleList([model.transformer_blocks[0]])
    return model


def sd3_items(config: dict, count: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` random pooled-text calibration items (``x [count, C, H, W]``, float ``t``, ``prompt_index``)
    with a table of ``count`` prompts of ``text_tokens`` tokens, pooled embeddings and the negative prompt."""
    g = torch.Generator().manual_seed(seed)
    side, width, pooled = config["sample_size"], config["joint_attention_dim"], config["pooled_projection_dim"]
    ones = torch.ones(count + 1, text_tokens, dtype=torch.long)
    return {
        "x": torch.randn(count, config["in_channels"], side, side, generator=g),
        "t": torch.rand(count, generator=g) * 1000, "prompt_index": torch.arange(count),
        "prompt_embeds": torch.randn(count, text_tokens, width, generator=g), "prompt_attention_mask": ones[:count],
        "negative_prompt_embeds": torch.randn(1, text_tokens, width, generator=g),
        "negative_prompt_attention_mask": ones[:1],
        "pooled_prompt_embeds": torch.randn(count, pooled, generator=g),
        "negative_pooled_prompt_embeds": torch.randn(1, pooled, generator=g),
    }


def model_batch(config: dict, count: int, text_tokens: int) -> dict[str, torch.Tensor]:
    """``count`` items doubled with the negative prompt: the model batch of a guided step."""
    items = sd3_items(config, count, text_tokens)
    return SD3.conditioning.with_unconditional(SD3.conditioning.batch(items, torch.arange(count)))


@torch.no_grad()
def forward_peak(model: torch.nn.Module, batch: dict[str, torch.Tensor], family: Family) -> tuple[int, Counts]:
    """``(activation peak bytes, op counts)`` of a bf16 forward of ``model`` (a model batch): the peak as the
    rise of the process's peak RSS (``VmHWM``, reset through ``/proc/self/clear_refs``) over the RSS with the
    weights and inputs allocated."""
    model = model.to(torch.bfloat16).eval()
    batch = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in batch.items()}
    family.forward(model, batch)  # warm-up: one-time allocations are not activations
    before = status_kb(os.getpid(), "VmRSS")
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # VmHWM := VmRSS
    family.forward(model, batch)
    peak = (status_kb(os.getpid(), "VmHWM") - before) * 1024
    with bf16_autocast():
        counts = count_ops(lambda: family.forward(model, batch))
    return peak, counts


def forward_measurements(config: dict, text_tokens: int = TEXT_TOKENS) -> tuple[int, Counts]:
    """:func:`forward_peak` of a 1-block SD3 model at 1 image + its negative copy."""
    torch.manual_seed(0)
    return forward_peak(one_block_sd3(config), model_batch(config, 1, text_tokens), SD3)


def inference_rows(config: dict, bits: tuple[int, ...], activations: int, family: Family = SD3,
                   batch: str = "1 + 1") -> dict[str, tuple[str, ...]]:
    """The packed model's inference memory per bit width: packed bytes + the forward's activation peak at
    ``batch`` (model batch, as the label says)."""
    rows = {f"1024 px forward activation peak, bf16, {batch} (GB, measured on the CPU)": ("-", f"{activations / GB:.2f}")}
    for b in bits:
        report = packed_report(config, b, family)
        rows[f"**inference w{b}: packed weights + activations (GB)**"] = (
            "-", f"**{(report.file_bytes + activations) / GB:.1f}** ({report.file_bytes / GB:.2f} + {activations / GB:.2f})")
    rows["bf16 transformer for comparison: weights + activations (GB)"] = ("-", f"{(2 * parameters(config, family) + activations) / GB:.1f}")
    return rows


def trajectory_row(config: dict, forward: Counts, run: tuple[int, int, int]) -> dict[str, tuple[str, ...]]:
    """Teacher trajectories of ``run``: per step and trajectory one guided forward of ``run[1]`` prompts."""
    return trajectory_time(combine([(config["num_layers"], forward)]), run)


def trajectory_time(model_forward: Counts, run: tuple[int, int, int]) -> dict[str, tuple[str, ...]]:
    """Teacher trajectories of ``run`` from the counts of one whole-model forward of one prompt (with its
    negative copy where the model has one): ``run[0] x run[1] x run[2]`` of them (4 + 4 = 4 x (1 + 1))."""
    opt, pes = SCENARIOS
    calls = run[0] * run[2] * run[1]
    return {f"teacher trajectories {run[0]} x {run[1]} x {run[2]}, bf16, H100 (projected)": (
        "-", f"{fmt_s(calls * model_forward.projected_s(opt))} - {fmt_s(calls * model_forward.projected_s(pes))}")}


def model_columns(config: dict, run: tuple[int, int, int], bits: tuple[int, ...], items: tuple[int, int],
                  kmeans_iters: int, started: Timer) -> dict[str, dict[str, tuple[str, ...]]]:
    """``{column: {quantity: (per block, whole model)}}`` of one model (``config``, the config's ``run``), a
    column per bit width."""
    activations, forward = forward_measurements(config)
    columns = {}
    for b in bits:
        measured = paper_batch(measure_block(config, b, items, TEXT_TOKENS, kmeans_iters=kmeans_iters, family=SD3,
                                             build=one_block_sd3, make_items=sd3_items,
                                             output_tokens=tokens(config) + TEXT_TOKENS))
        rows = {**scale_rows(config, measured, kmeans_counts(config, b), (b,), SD3, TEXT_TOKENS, run),
                **inference_rows(config, (b,), activations), **trajectory_row(config, forward, run)}
        columns[f"w{b}"] = {q.replace(f" w{b}", ""): cells for q, cells in rows.items()}  # the column names the bits
        print(f"measured: {hidden(config)} wide, w{b} ({started.elapsed:.0f} s)", flush=True)
    return columns


def table(name: str, columns: dict[str, dict[str, tuple[str, ...]]], items: tuple[int, int],
          config: dict | None = None) -> str:
    """One model's caption and markdown table: a row per quantity, per column its per-block and model cells."""
    config = config or MODELS[name][0]
    layers = config["num_layers"]
    caption = (f"SD3.5-{name} ({layers} joint blocks, {hidden(config)} wide, 1024 px: {tokens(config)} image + "
               f"{TEXT_TOKENS} text tokens), default recipe, bf16-mixed, bf16 teacher, all soft (first step), batch "
               f"4 + 4 (extrapolated from {' and '.join(f'{i} + {i}' for i in items)}); {machine_line(label='measured on')}")
    names = list(next(iter(columns.values())))
    header = ["quantity"] + [f"{c} {part}" for c in columns for part in ("per block", f"model ({layers} blocks)")]
    return caption + "\n\n" + markdown_table(header, [[q, *(cell for c in columns.values() for cell in c[q])] for q in names])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=[*MODELS, "flux-dev"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    args = parse_measure_arguments(parser)
    started = Timer()
    print(f"{PROJECTION_BANNER}\n", flush=True)
    for name in args.models:  # each table as soon as its model is measured
        if name == "flux-dev":
            from benchmarks.flux_scale import FLUX_DEV, RUN, flux_columns, flux_table  # it imports this module
            columns = flux_columns(FLUX_DEV, RUN, tuple(args.bits), tuple(args.items), args.kmeans_iters, started)
            print(flux_table(columns, tuple(args.items)) + "\n", flush=True)
            continue
        columns = model_columns(*MODELS[name], tuple(args.bits), tuple(args.items), args.kmeans_iters, started)
        print(table(name, columns, tuple(args.items)) + "\n", flush=True)
    print(f"script wall time: {started.elapsed:.0f} s")


if __name__ == "__main__":
    main()
