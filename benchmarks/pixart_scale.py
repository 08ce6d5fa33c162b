"""PixArt-Σ at real size: calibration memory per block, packed size and projected H100 time.

PixArt-Σ XL/2 (``PixArtTransformer2DModel``: 28 blocks, 1152 wide, 300 T5 tokens of 4096 channels) is
never loaded: the whole model is built on the meta device (shapes only: parameter counts, the packed size
from :func:`vq4dit.size.size_report`), and ONE real block at a time is materialised on the CPU as a
1-block model with random weights (the values change neither memory nor op counts). On it, at the real
token counts (1024 px: 4096 image tokens, 512 px: 1024), as ``configs/pixart_sigma_1024.yaml`` runs:

- the student build of the default recipe (input statistics on a few items, k-means, error feedback):
  CPU seconds per block, measured;
- one calibration step, all soft (teacher forward, student forward, block loss, backward, RMSprop,
  ``CandidatePruning``) under CPU bf16 autocast (Lightning's ``bf16-mixed``), bf16 teacher: the tensors
  it holds (teacher and student block, optimizer state, logit gradients) and every tensor autograd saves
  for the backward (``saved_tensors_hooks``), and its aten ops (``benchmarks.roofline``);

at ``--items`` 1 and 2 prompts (+ as many negative-prompt copies), extrapolated linearly to the paper's
batch of 4 + 4 (``fit_blocks``: the activations and their ops grow with the items, the weight-sized
tensors and ops, e.g. the soft reconstruction, do not; attention saves O(tokens) on both devices: SDPA's
flash / memory-efficient kernels). The whole model is 28 such blocks: the projected H100 step counts the 1-block model's
patch embedding, caption projection and output head once per block (an upper bound). The k-means of
every quantized Linear is projected as ``benchmarks/projection.py`` projects DiT-XL/2's
(``benchmarks.projection_kmeans``: one 1152 x 1152 layer counted, scaled by shape).

PROJECTIONS, NOT MEASUREMENTS, wherever a column says H100 (no GPU was used).

    python -m benchmarks.pixart_scale                              # 512 and 1024 px, w2 (75 s here, 1 thread)
    python -m benchmarks.pixart_scale --resolutions 512 --bits 2 3 --kmeans-iters 25
"""

from __future__ import annotations

import argparse
import contextlib
from typing import Any, Callable

import torch
from diffusers import PixArtTransformer2DModel

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.projection import bf16_autocast, steady_optimizer
from benchmarks.projection_kmeans import measure_kmeans, project_kmeans
from benchmarks.recipe_configs import recipe_settings
from benchmarks.roofline import PROJECTION_BANNER, SCENARIOS, Counts, count_ops, fit_blocks, fmt_s
from benchmarks.throughput import CalibrationStep
from callbacks import CandidatePruning
from vq4dit.engine import Calibrator
from vq4dit.families import PIXART, Family
from vq4dit.families.conditioning import batch_size
from vq4dit.layers import VQLinear
from vq4dit.size import SizeReport, size_report

GB = 1e9
SIGMA = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
             cross_attention_dim=1152, caption_channels=4096, patch_size=2, norm_type="ada_norm_single",
             use_additional_conditions=False)  # PixArt-Σ XL/2 (the hub config's values)
RESOLUTIONS = {1024: {"sample_size": 128, "interpolation_scale": 2}, 512: {"sample_size": 64, "interpolation_scale": 1}}
TEXT_TOKENS = 300  # PixArtSigmaPipeline's max_sequence_length
GUIDANCE = 4.5  # the pipeline's default: every item also runs with the negative prompt
PAPER_ITEMS = 4  # 4 prompts + 4 negative-prompt copies: model batch 8
RUN = (100, 4, 20)  # configs/pixart_sigma_1024.yaml: trajectories, prompts per trajectory, steps


def sigma_config(resolution: int, **changes: Any) -> dict:
    """The ``PixArtTransformer2DModel`` config of PixArt-Σ at ``resolution`` px (1024 or 512), with ``changes``."""
    return {**SIGMA, **RESOLUTIONS[resolution], **changes}


def tokens(config: dict) -> int:
    """Image tokens: ``(sample_size / patch_size)^2``."""
    return (config["sample_size"] // config["patch_size"]) ** 2


def hidden(config: dict) -> int:
    """Model width: heads x head dim."""
    return config["num_attention_heads"] * config["attention_head_dim"]


def packed_report(config: dict, bits: int, family: Family = PIXART) -> SizeReport:
    """Size accounting of the whole model at ``bits`` (default recipe: row scales), built on meta."""
    vq, _ = recipe_settings("quality", bits)
    with torch.device("meta"):
        model = family.model_class(**config)
    chosen = family.linear_filter()
    for name, linear in [(n, m) for n, m in model.named_modules() if chosen(m, n)]:
        parent, _, child = name.rpartition(".")
        layer = VQLinear(linear.in_features, linear.out_features, vq, bias=linear.bias is not None, device="meta")
        setattr(model.get_submodule(parent), child, layer)
    return size_report(model)


def text_items(config: dict, count: int, text_tokens: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``count`` random calibration items of a text model (``x [count, C, H, W]``, ``t``, ``prompt_index``)
    with a table of ``count`` prompts of ``text_tokens`` tokens and the negative prompt (all tokens valid)."""
    g = torch.Generator().manual_seed(seed)
    side, channels = config["sample_size"], config["caption_channels"]
    return {
        "x": torch.randn(count, config["in_channels"], side, side, generator=g),
        "t": torch.randint(0, 1000, (count,), generator=g), "prompt_index": torch.arange(count),
        "prompt_embeds": torch.randn(count, text_tokens, channels, generator=g),
        "prompt_attention_mask": torch.ones(count, text_tokens, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, text_tokens, channels, generator=g),
        "negative_prompt_attention_mask": torch.ones(1, text_tokens, dtype=torch.long),
    }


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class SavedTensors:
    """Bytes of the tensors autograd saves for the backward (each storage once; not ``module``'s own
    parameters and buffers): activations, and the dense weights and ratios of the soft layers."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.own = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}
        self.seen: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in self.own:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    def hooks(self) -> contextlib.AbstractContextManager:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())


def one_block_pixart(config: dict) -> torch.nn.Module:
    """A 1-block ``PixArtTransformer2DModel`` of ``config`` (random weights)."""
    return PixArtTransformer2DModel(**{**config, "num_layers": 1})


def measure_block(config: dict, bits: int, items: tuple[int, ...] = (1, 2), text_tokens: int = TEXT_TOKENS,
                  statistics_items: int = 1, kmeans_iters: int = 2, family: Family = PIXART,
                  build: Callable[[dict], torch.nn.Module] = one_block_pixart,
                  make_items: Callable[..., dict[str, torch.Tensor]] = text_items,
                  output_tokens: int | None = None) -> dict[int, dict[str, Any]]:
    """One real block of ``config`` (``build``: a 1-block model of ``family``, random weights) built once as
    a fit builds it (default recipe, ``statistics_items`` items of ``make_items(config, count, text_tokens,
    seed)`` for its statistics, ``kmeans_iters`` Lloyd iterations), then per entry of ``items`` one soft
    calibration step from that start on so many prompts + their negative copies: ``{items: byte sizes, CPU
    seconds of the build, op counts of the step}``. ``output_tokens``: the tokens of the block output the
    loss keeps (default: the image tokens)."""
    torch.manual_seed(0)
    teacher = build(config).eval()
    vq, calibration = recipe_settings("quality", bits, {"teacher_dtype": "bfloat16"}, kmeans_iters=kmeans_iters)
    statistics = make_items(config, statistics_items, text_tokens, seed=1)
    with Timer() as build:
        engine = Calibrator.build(teacher, vq, calibration, guidance_scale=GUIDANCE, progress=False, items=statistics)
    start = engine.snapshot()
    t_block, s_block = family.blocks(engine.teacher)[0], family.blocks(engine.student)[0]
    layers = [m for m in s_block.modules() if isinstance(m, VQLinear)]
    results = {}
    for count in items:
        for name, layer in engine.layers.items():  # the built start, soft (engine.restore_ would finalise it)
            layer.load_state_dict(start[name])
        engine.update_codebook_trainability()
        step = CalibrationStep(engine, CandidatePruning(), bf16_autocast)
        steady_optimizer(step.optimizer)
        batch = family.conditioning.batch(make_items(config, count, text_tokens), torch.arange(count))
        copies = batch_size(family.conditioning.guided(batch, GUIDANCE)) // count  # 2: negative copies; Flux: 1
        saved = SavedTensors(engine.student)

        state = [v for s in step.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
        results[count] = {  # at the start, every row soft: before the step's pruning hardens any
            "teacher_block": nbytes(t_block.parameters()),
            "student_block": nbytes((*s_block.parameters(), *s_block.buffers())),
            "optimizer": nbytes(state),
            "logit_grads": nbytes(m.candidate_logits for m in layers),  # alive from the backward to the step
            "teacher_output": copies * count * (output_tokens or tokens(config)) * hidden(config) * 2,  # loss target, bf16
        }

        def calibration_step() -> None:
            with saved.hooks():
                step(batch)

        counts = count_ops(calibration_step)
        results[count].update({
            "saved": saved.bytes,
            "build_seconds": {**engine.phase_seconds, "total": build.seconds}, "step": counts,
        })
    return results


def paper_batch(by_items: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Measurements at two item counts extrapolated linearly to ``PAPER_ITEMS`` (sizes and op counts);
    ``step_cpu_s``: the measured CPU seconds of the steps."""
    (i1, m1), (i2, m2) = sorted(by_items.items())
    slope = (PAPER_ITEMS - i1) / (i2 - i1)
    result = {key: m1[key] + slope * (m2[key] - m1[key]) for key in m1 if isinstance(m1[key], (int, float))}
    result["step"] = fit_blocks({i1: m1["step"], i2: m2["step"]}, PAPER_ITEMS)
    result["build_seconds"] = m1["build_seconds"]
    result["step_cpu_s"] = " / ".join(f"{by_items[i]['step'].wall_s:.1f}" for i in sorted(by_items))
    return result


def item_bytes(config: dict) -> int:
    """Host RAM of one trajectory item: latents ``x`` (float32), ``t`` and ``prompt_index`` (int64)."""
    return config["in_channels"] * config["sample_size"] ** 2 * 4 + 2 * 8


def block_input_bytes(config: dict, text_tokens: int = TEXT_TOKENS) -> int:
    """One block's inputs for one item and its negative copy, bf16: hidden states, caption states, the
    timestep modulation ``[6 x hidden]``: what caching block inputs would store per item and block."""
    return 2 * (tokens(config) + text_tokens + 6) * hidden(config) * 2


def scale_rows(config: dict, measured: dict[str, Any], kmeans: Counts, bits: tuple[int, ...], family: Family = PIXART,
               text_tokens: int = TEXT_TOKENS, run: tuple[int, int, int] = RUN) -> dict[str, tuple[str, ...]]:
    """``{quantity: (per block, whole model)}`` of one model and resolution from its measurements at the paper
    batch; ``run``: the config's trajectories, prompts per trajectory and steps."""
    return kind_rows({"block": (measured, config["num_layers"])}, kmeans,
                     {b: packed_report(config, b, family) for b in bits}, run,
                     block_input_bytes(config, text_tokens), item_bytes(config))


def held_bytes(measured: dict[str, Any]) -> float:
    """What one block holds all step: teacher and student block, optimizer state, the loss's teacher output."""
    return measured["teacher_block"] + measured["student_block"] + measured["optimizer"] + measured["teacher_output"]


def kind_rows(kinds: dict[str, tuple[dict[str, Any], int]], kmeans: Counts, packed: dict[int, SizeReport],
              run: tuple[int, int, int], input_bytes: int, host_item_bytes: int,
              copies: int = 2) -> dict[str, tuple[str, ...]]:
    """``{quantity: (a cell per block kind, whole model)}``: ``kinds`` maps a block kind to its measurements
    at the paper batch and its number of blocks (the model cell: their sum); ``packed``: the packed size per
    bit width; ``input_bytes``: one item's block inputs (with its ``copies``: 2 with the negative prompt, 1
    for a guidance-distilled model); ``host_item_bytes``: one trajectory item in host RAM."""
    opt, pes = SCENARIOS
    items, cases = run[0] * run[1] * run[2], list(kinds.values())
    blank = ("-",) * len(cases)
    pair = (lambda i: f"{i} + {i}") if copies == 2 else str
    held = held_bytes

    def gb(value: float, bold: bool = False) -> str:
        return f"**{value / GB:.1f}**" if bold else f"{value / GB:.2f}"

    def cells(value: Callable[[dict[str, Any]], float], bold: bool = False) -> tuple[str, ...]:
        return (*(gb(value(m), bold) for m, _ in cases), gb(sum(n * value(m) for m, n in cases), bold))

    def h100(value: Callable[[str], float]) -> str:
        return f"{fmt_s(value(opt))} - {fmt_s(value(pes))}"

    batch = pair(PAPER_ITEMS)
    rows = {
        "held all step: teacher + student block, RMSprop state, teacher block output (GB)": cells(held),
        f"saved for the backward at {batch} (GB)": cells(lambda m: m["saved"]),
        "**calibration step peak, GPU (GB)**": cells(lambda m: held(m) + max(m["saved"], m["logit_grads"]), True),
        f"block inputs of {items:,} items if recorded (GB, bf16)": cells(lambda m: items * input_bytes),
        f"trajectory items {run[0]} x {run[1]} x {run[2]}, host RAM (GB)": (*blank, gb(items * host_item_bytes)),
        f"student build, CPU s: statistics ({pair(1)} items) / k-means (2 iters) / feedback": (*(
            " / ".join(f"{m['build_seconds'].get(p, 0.0):.1f}" for p in ("statistics", "kmeans", "feedback"))
            for m, _ in cases), "-"),
        "k-means init + feedback (25 iters), H100 (projected)": (*blank, h100(kmeans.projected_s)),
        f"soft step, CPU s at {pair(1)} / {pair(2)} (measured)": (*(m["step_cpu_s"] for m, _ in cases), "-"),
        f"soft step at {batch}, TFLOP": (*(f"{m['step'].flops / 1e12:.2f}" for m, _ in cases),
                                         f"{sum(n * m['step'].flops for m, n in cases) / 1e12:.1f}"),
        f"**soft step at {batch}, H100 (projected)**": (*(h100(m["step"].projected_s) for m, _ in cases),
                                                        h100(lambda s: sum(n * m["step"].projected_s(s) for m, n in cases))),
    }
    for b, report in packed.items():
        rows[f"packed file w{b}, MiB (FP tensors float32)"] = (*blank, f"{report.file_bytes / 2 ** 20:,.0f} "
                                                               f"({report.other_bytes / 2 ** 20:,.0f} FP)")
    return rows


def parse_measure_arguments(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``parser``'s arguments with the real-size benchmarks' shared options (``--items``, ``--kmeans-iters``,
    ``--threads``: set for torch)."""
    parser.add_argument("--items", type=int, nargs=2, default=[1, 2], help="prompts of the two measured steps")
    parser.add_argument("--kmeans-iters", type=int, default=2, help="Lloyd iterations of the measured build")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    return args


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024], choices=sorted(RESOLUTIONS))
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], help="packed sizes (the measured block: the first)")
    args = parse_measure_arguments(parser)
    started = Timer()
    columns: dict[str, dict[str, tuple[str, str]]] = {}
    for resolution in args.resolutions:
        config = sigma_config(resolution)
        measured = paper_batch(measure_block(config, args.bits[0], tuple(args.items), kmeans_iters=args.kmeans_iters))
        vq, _ = recipe_settings("quality", args.bits[0], kmeans_iters=25)
        if resolution == args.resolutions[0]:  # the k-means does not depend on the resolution
            with torch.device("meta"):
                shapes = [(m.out_features, m.in_features) for n, m in PixArtTransformer2DModel(**config).named_modules()
                          if PIXART.linear_filter()(m, n)]
            kmeans = project_kmeans(measure_kmeans(vq, hidden(config), 2), hidden(config), 2, 25, shapes)
        columns[f"{resolution} px"] = scale_rows(config, measured, kmeans, tuple(args.bits))
        print(f"measured: {resolution} px ({started.elapsed:.0f} s)", flush=True)
    layers = SIGMA["num_layers"]
    print(f"\n{PROJECTION_BANNER}\n\nPixArt-Σ XL/2 ({layers} blocks, {TEXT_TOKENS} text tokens), w{args.bits[0]} default "
          f"recipe, bf16-mixed, bf16 teacher, all soft (first step), batch 4 + 4 (extrapolated from "
          f"{' and '.join(f'{i} + {i}' for i in args.items)}); {machine_line(label='measured on')}\n")
    names = list(next(iter(columns.values())))
    header = ["quantity"] + [f"{c} {part}" for c in columns for part in ("per block", f"model ({layers} blocks)")]
    print(markdown_table(header, [[name, *(cell for c in columns.values() for cell in c[name])] for name in names]))
    print(f"\nscript wall time: {started.elapsed:.0f} s")


if __name__ == "__main__":
    main()
