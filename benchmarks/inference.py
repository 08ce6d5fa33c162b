"""Low-memory quantized inference: one DiT-XL/2-256 forward, FP vs hard VQ (decode / cached mode).

Each configuration runs in its own subprocess, so that its peak RSS (``ru_maxrss``: the whole
process, Python + torch + model + activations) is its own. Models are built on the ``meta``
device and materialised with seeded random values: the FP model holds its dense fp32 weights,
the quantized one only random codebooks/codes of the right shapes for the 7 core Linears of each
block (time and memory do not depend on the values; k-means of 669 M weights would take far too
long here) and dense fp32 tensors for everything else (per-block embedders, patch embedding,
output head). No dense weight of a quantized layer is ever materialised while building.

Every public DiT-XL/2 checkpoint (the original ``.pt`` files and the diffusers hub snapshots
converted from them) holds one timestep/label embedder, copied into each of the 28 diffusers
blocks: ``save_quantized`` stores it once and ``load_quantized`` ties the copies back into one
tensor. Quantized configs model that by default (``--embedders shared``: block 0's embedder tensors
tied into every block with ``tie_tensors_``, as ``load_quantized`` does); ``--embedders separate``
keeps 28 copies (a model trained in the diffusers layout, like the shipped reference DiT). The FP
row is always the stock diffusers model, 28 copies, as ``from_pretrained`` gives it.

The forward batch is ``--batch`` latents 4x32x32 (default 4: 2 latents + their null-label copies,
one classifier-free-guidance step of DiTPipeline), under ``torch.no_grad`` like the pipeline.

Quantized configs are named ``w<bits>[-paper]-<mode>``: each recipe's layers (``--recipes``, default both;
``benchmarks.recipe_configs``): the default's carry a row scale per output row (its other levers
change the values, not the forward), the paper's none.

    python -m benchmarks.inference                       # FP, w2 and w3 (decode, cached), both recipes; ~10 min
    python -m benchmarks.inference --bits 2 --batch 1    # the few-token regime
    python -m benchmarks.inference --embedders separate  # 28 embedder copies in the quantized models
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from benchmarks.common import machine_line, markdown_table
from benchmarks.recipe_configs import LABELS, RECIPES, recipe_settings
from vq4dit.export import size_report, tie_tensors_
from vq4dit.models import default_linear_filter, preset_config
from vq4dit.decoding import DECODE_CHUNK_ELEMENTS
from vq4dit.layers import VQLinear
from vq4dit.quantize import set_inference_mode_, vq_layers
from vq4dit.packing import identical_tensors

PRESET = "DiT-XL/2-256"
MIB = 1024**2
_RESULT = "RESULT "


def shared_embedder_aliases(model: nn.Module) -> dict[str, str]:
    """``{block b's embedder tensor: block 0's}`` for b >= 1: what ``save_quantized`` records for a
    converted DiT checkpoint (each block holds a copy of the original's one embedder)."""
    first = "transformer_blocks.0.norm1.emb"
    keys = list(model.transformer_blocks[0].norm1.emb.state_dict())
    return {f"transformer_blocks.{b}.norm1.emb.{key}": f"{first}.{key}"
            for b in range(1, len(model.transformer_blocks)) for key in keys}


def build_skeleton(bits: int | None, shared_embedders: bool = False, recipe: str = "quality") -> DiTTransformer2DModel:
    """DiT-XL/2-256 on the meta device; with ``bits``, its core Linears are (meta) ``VQLinear``s of
    ``recipe``; with ``shared_embedders``, every block's embedder is tied to block 0's (as after ``load_quantized``)."""
    with torch.device("meta"):
        model = DiTTransformer2DModel(**preset_config(PRESET))
    if bits is not None:
        config, _ = recipe_settings(recipe, bits, num_candidates=1)
        targets = [name for name, module in model.named_modules() if default_linear_filter(module, name)]
        for name in targets:
            linear = model.get_submodule(name)
            parent, _, child = name.rpartition(".")
            layer = VQLinear(
                linear.in_features, linear.out_features, config, bias=linear.bias is not None, device="meta"
            )
            setattr(model.get_submodule(parent), child, layer)
    if shared_embedders:
        tie_tensors_(model, shared_embedder_aliases(model))
    return model.eval()


@torch.no_grad()
def materialise_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Allocate every tensor on the CPU and fill it from a seeded generator: N(0, 0.02) floats,
    uniform codes in ``[0, k)``. Only what the skeleton declares is allocated; tied tensors stay
    tied (``to_empty`` unties them: they are tied again before anything is written)."""
    tied = identical_tensors(model.state_dict(keep_vars=True), min_bytes=0)  # on meta: the tied ones
    model.to_empty(device="cpu")
    tie_tensors_(model, tied)
    generator = torch.Generator().manual_seed(seed)
    codebook_sizes = {f"{name}.codes": layer.config.codebook_size for name, layer in vq_layers(model).items()}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if name in codebook_sizes:  # in place: no int64 temporary
            tensor.random_(0, codebook_sizes[name], generator=generator)
        elif tensor.is_floating_point():
            tensor.normal_(0.0, 0.02, generator=generator)
        elif tensor.numel():
            tensor.zero_()
    return model


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers, tied ones once (the cached dense weights included when
    present)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def run_child(config: str, batch: int, repeats: int, threads: int, chunk_elements: int = 0,
              shared_embedders: bool = True) -> dict:
    """Build one configuration (``fp``, ``w2-decode``, ``w3-cached``, ...) and time its forward:
    wall seconds and process CPU seconds (less sensitive to other work on a shared machine)."""
    torch.set_num_threads(threads)
    baseline = rss_mib()
    bits, mode = (None, None) if config == "fp" else (int(config[1]), config.split("-")[-1])
    recipe = "paper" if "-paper-" in config else "quality"
    model = materialise_(build_skeleton(bits, shared_embedders and bits is not None, recipe))
    if mode is not None:
        set_inference_mode_(model, mode)
        for layer in vq_layers(model).values():
            layer.decode_chunk_elements = chunk_elements or layer.decode_chunk_elements
    built = rss_mib()
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(batch, 4, 32, 32, generator=generator)
    timesteps = torch.randint(0, 1000, (batch,), generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    if batch > 1:
        labels[batch // 2 :] = 1000  # the null-label half of a classifier-free-guidance batch
    times, cpu_times = [], []
    with torch.no_grad():
        for _ in range(repeats + 1):  # the first forward is a warm-up (and builds the cache)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = model(latents, timestep=timesteps, class_labels=labels).sample
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {
        "config": config, "baseline_mib": baseline, "built_mib": built,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "tensor_mib": tensor_bytes(model) / MIB, "first_s": times[0], "median_s": statistics.median(times[1:]),
        "min_s": min(times[1:]), "cpu_s": statistics.median(cpu_times[1:]),
        "finite": bool(torch.isfinite(out).all()), "checksum": float(out.double().sum()),
    }


def spawn(config: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "benchmarks.inference", "--child", config, "--batch", str(args.batch), "--repeats",
               str(args.repeats), "--threads", str(args.threads), "--chunk-elements", str(args.chunk_elements),
               "--embedders", args.embedders]
    done = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(_RESULT)]
    if done.returncode or not lines:
        raise SystemExit(f"{config} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(_RESULT):])


def median_of(runs: list[dict], key: str):
    """Median over runs of a numeric field; other fields from the first run."""
    values = [run[key] for run in runs]
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    return statistics.median(values) if numeric else values[0]


def packed_sizes(bits: int, shared_embedders: bool, recipe: str = "quality") -> tuple[int, int, int]:
    """(fp32 state-dict bytes, packed file bytes, in-memory bytes) of DiT-XL/2-256 under ``recipe``, from shapes."""
    fp32 = sum(t.numel() * 4 for t in build_skeleton(None).state_dict().values())
    quantized = build_skeleton(bits, shared_embedders, recipe)
    return fp32, size_report(quantized).file_bytes, tensor_bytes(quantized)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--batch", type=int, default=4, help="forward batch of 4x32x32 latents (default 4 = 2 + CFG)")
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards after one warm-up (median)")
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3], choices=[2, 3], help="VQ presets w2/w3")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="recipes of the quantized layers (quality: the default, with row scales)")
    parser.add_argument("--modes", nargs="+", default=["decode", "cached"], choices=["decode", "cached"],
                        help="inference modes to run besides FP")
    parser.add_argument("--chunk-elements", type=int, default=0,
                        help="decode mode: weights decoded at a time (default 0: the library's "
                             "DECODE_CHUNK_ELEMENTS; a huge value decodes each layer whole)")
    parser.add_argument("--embedders", default="shared", choices=["shared", "separate"],
                        help="quantized models: per-block embedders tied as load_quantized does for converted "
                             "checkpoints (default), or 28 separate copies")
    parser.add_argument("--runs", type=int, default=1, help="processes per config (table: medians, peak range)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if min(args.threads, args.batch, args.repeats, args.runs) < 1 or args.chunk_elements < 0:
        parser.error("--threads, --batch, --repeats and --runs must be >= 1, --chunk-elements >= 0")
    if args.child:
        result = run_child(args.child, args.batch, args.repeats, args.threads, args.chunk_elements,
                           args.embedders == "shared")
        print(_RESULT + json.dumps(result), flush=True)
        return

    load = os.getloadavg()[0]
    print(machine_line(f"load average {load:.2f} at start, {args.threads} thread(s) per run") + "\n"
          f"{PRESET}, batch {args.batch} x 4x32x32, torch.no_grad, fp32; median of {args.repeats} after 1 warm-up, "
          f"{args.runs} process(es) per config; decode chunks of {args.chunk_elements or DECODE_CHUNK_ELEMENTS:,} "
          f"weights; quantized models: embedders {args.embedders}")
    print()
    configs = ["fp"] + [f"w{b}{'' if r == 'quality' else '-' + LABELS[r]}-{mode}"
                        for b in args.bits for r in args.recipes for mode in args.modes]
    runs: dict[str, list[dict]] = {config: [] for config in configs}
    for _ in range(args.runs):  # rounds: each config once per round, so drifting load hits all alike
        for config in configs:
            runs[config].append(spawn(config, args))
            print(f"<!-- {config}: {json.dumps(runs[config][-1])} -->", flush=True)
    results = {config: {key: median_of(rs, key) for key in rs[0]} for config, rs in runs.items()}
    fp = results["fp"]
    print()
    table = []
    for config in configs:
        r, peaks = results[config], [run["peak_mib"] for run in runs[config]]
        spread = f" ({min(peaks):.0f}-{max(peaks):.0f})" if len(peaks) > 1 else ""
        same = ""
        if config.endswith("-cached") and config.replace("cached", "decode") in runs:
            decoded = {run["checksum"] for run in runs[config.replace("cached", "decode")]}
            same = ", = decode" if {run["checksum"] for run in runs[config]} == decoded else ", != decode!"
        finite = all(run["finite"] for run in runs[config])
        table.append([config, f"{r['peak_mib']:.0f}{spread}", f"{r['peak_mib'] / fp['peak_mib']:.3f}",
                      f"{r['built_mib']:.0f}", f"{r['tensor_mib']:.0f}", f"{r['first_s']:.2f}", f"{r['median_s']:.2f}",
                      f"{r['min_s']:.2f}", f"{r['median_s'] / fp['median_s']:.3f}", f"{r['cpu_s']:.2f}",
                      f"{r['cpu_s'] / fp['cpu_s']:.3f}", f"{'finite' if finite else 'NOT FINITE'}{same}"])
    print(markdown_table(["config", "peak RSS MiB", "peak vs FP", "RSS after build MiB", "model tensors MiB",
                          "first fwd s", "median fwd s", "min fwd s", "time vs FP", "median CPU s", "CPU vs FP",
                          "output"], table))
    print(f"\nPython + torch + diffusers before building a model: {fp['baseline_mib']:.0f} MiB RSS.")
    print()
    sizes = [(f"w{bits} {LABELS[r]}", *packed_sizes(bits, args.embedders == "shared", r))
             for bits in args.bits for r in args.recipes]
    print(markdown_table(
        ["DiT-XL/2-256", "fp32 bytes", "packed file bytes", "in memory bytes (codes as uint8)", "file vs fp32"],
        [[run, f"{fp32:,}", f"{packed:,}", f"{memory:,}", f"{packed / fp32:.4f} ({fp32 / packed:.2f}x smaller)"]
         for run, fp32, packed, memory in sizes]))

if __name__ == "__main__":
    main()
