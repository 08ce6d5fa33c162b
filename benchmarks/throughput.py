"""Throughput: one calibration step vs one plain FP fine-tuning step of the same model and batch.

Calibration step = the real code, the calls a fit makes on its ``vq4dit.engine.Calibrator``:
``update_codebook_trainability`` + ``step_loss`` (teacher forward under no_grad, student forward
with soft reconstruction, block losses, ratio regulariser), ``zero_grad``, backward, RMSprop step,
then what ``CandidatePruning`` does after it (``prune_``: hardening, pruning, finalising, as
configured for the paper runs: every step; ``soft_counts`` for its logged counts). Lightning's loop
and logging are left out, the same for both sides.

FP fine-tuning step = the same DiT in full precision, every parameter trainable, the same batch
(4 classes + 4 null labels), the same block-wise MSE against fixed targets (no teacher forward),
backward, and an RMSprop (calibration's settings) or AdamW step.

Recipes (``--recipes``, default both): the student of each row is built as ``train.py fit
--model.recipe R`` builds it (``benchmarks.recipe_configs``: ``apply_recipe``, ``Calibrator.build``);
the default recipe gathers its input statistics from teacher forwards over ``--statistics-items``
random items (+ null copies), and the preparation table gives the build's phases (statistics,
k-means, error feedback) and the full ``E[x x^T]`` it held.

Cases: the ``DiT-S/2-256`` preset, and one DiT-XL/2 block (a 1-block DiT-XL/2-256: batch 8 x
256 tokens x 1152; the patch embedding and output head are included, they are ~1 % of the
FLOPs). Steps of both kinds alternate, so machine load hits both alike; medians are reported.

    python -m benchmarks.throughput                          # S/2 and XL block, w2 and w3, both recipes
    python -m benchmarks.throughput --cases S --bits 2 --profile
    python -m benchmarks.throughput --precision bf16-mixed   # CPU autocast, as Lightning's bf16-mixed
    python -m benchmarks.throughput --cases S --compile      # torch.compile of the soft reconstruction

``--compile`` replaces the soft rows' forward (``vq4dit.soft._soft_mix``: ratios, gathers, weighted
sum) and their logits gradient (``_soft_logits_grad``) by ``torch.compile(dynamic=True)`` versions
(Inductor: one fused C++ loop each on the CPU); compilation happens in the warm-up steps.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from benchmarks.common import Timer, machine_line, markdown_table
from benchmarks.recipe_configs import LABELS, RECIPES, build_engine, full_moment_bytes
from callbacks import CandidatePruning
from vq4dit.engine import Calibrator
from vq4dit.models import block_modules, capture_blocks, load_dit, preset_config
from vq4dit.sampling import NULL_CLASS

ITEMS = 4  # classes per batch; each with its null-label copy: model batch 8 (official)
REGIONS = ("teacher forward", "student forward", "backward", "optimizer", "pruning callback")


def xl_block_folder(folder: str, num_layers: int = 1) -> str:
    """Save a random-init ``num_layers``-block DiT-XL/2-256 (diffusers layout) and return its folder."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    DiTTransformer2DModel(**{**preset_config("DiT-XL/2-256"), "num_layers": num_layers}).save_pretrained(folder)
    return folder


def make_batch(model, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ITEMS`` random items plus their null-label copies: ``x [8, C, H, W]``, ``t [8]``, ``y [8]``."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    x = torch.randn(ITEMS, config.in_channels, config.sample_size, config.sample_size, generator=generator)
    t = torch.randint(0, 1000, (ITEMS,), generator=generator)
    y = torch.randint(0, config.num_embeds_ada_norm, (ITEMS,), generator=generator)
    return torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, NULL_CLASS)])


class RegionTimer:
    """Wall time per named region; teacher/student forwards are timed by hooks on their roots
    (they run inside ``block_losses``), and each region is also a ``torch.profiler`` range."""

    def __init__(self, engine: Calibrator) -> None:
        self.seconds: dict[str, float] = {}
        self._open: dict[str, tuple[float, object]] = {}
        for name, model in (("teacher forward", engine.teacher), ("student forward", engine.student)):
            model.register_forward_pre_hook(lambda *_, n=name: self.start(n))
            model.register_forward_hook(lambda *_, n=name: self.stop(n))

    def start(self, name: str) -> None:
        scope = torch.profiler.record_function(name)
        scope.__enter__()
        self._open[name] = (time.perf_counter(), scope)

    def stop(self, name: str) -> None:
        began, scope = self._open.pop(name)
        scope.__exit__(None, None, None)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - began

    @contextlib.contextmanager
    def region(self, name: str):
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)


class CalibrationStep:
    """One real calibration step (see the module docstring). ``pruning`` gives the thresholds and
    the interval of ``engine.prune_`` (a configured ``CandidatePruning``); ``batch`` already holds
    the null-label copies, so ``engine`` is built with ``guidance_scale=1.0``."""

    def __init__(self, engine: Calibrator, pruning: CandidatePruning, autocast) -> None:
        self.engine, self.pruning, self.autocast = engine, pruning, autocast
        self.optimizer = engine.make_optimizer()
        self.timer = RegionTimer(engine)
        self.step = 0  # optimisation steps done: a fit's global_step

    def __call__(self, batch) -> float:
        engine, timer, pruning = self.engine, self.timer, self.pruning
        with Timer() as step:
            engine.update_codebook_trainability()  # the module's on_train_batch_start
            with self.autocast():  # forward only, as Lightning's precision plugin
                loss = engine.step_loss(batch, self.step).loss
            self.optimizer.zero_grad(set_to_none=True)  # Lightning's order: after the forward
            with timer.region("backward"):
                loss.backward()
            with timer.region("optimizer"):
                self.optimizer.step()
            self.step += 1
            with timer.region("pruning callback"):
                if self.step % pruning.every_n_steps == 0:  # CandidatePruning.on_train_batch_end
                    engine.prune_(self.optimizer, pruning.harden_threshold, pruning.prune_floor,
                                  pruning.finalize_fraction)
                    engine.soft_counts()  # the counts the callback logs (a host sync on a GPU)
        return step.seconds


class FineTuneStep:
    """One plain FP fine-tuning step: block-wise MSE to fixed targets, all parameters trained."""

    def __init__(self, teacher, batch, optimizer: str, autocast) -> None:
        self.autocast = autocast
        self.model = copy.deepcopy(teacher).requires_grad_(True).eval()
        self.blocks = block_modules(self.model)
        x, t, y = batch
        with torch.no_grad(), capture_blocks(self.blocks) as (outputs, _):
            self.model(x, timestep=t, class_labels=y)
        self.targets = [o.detach().clone() for o in outputs]
        params = list(self.model.parameters())
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        else:
            self.optimizer = torch.optim.RMSprop(params, lr=1e-4, alpha=0.9, eps=1e-8)

    def __call__(self, batch) -> float:
        x, t, y = batch
        with Timer() as step:
            with self.autocast(), capture_blocks(self.blocks) as (outputs, _):
                self.model(x, timestep=t, class_labels=y)
                loss = torch.stack([F.mse_loss(o.float(), target.float())
                                    for o, target in zip(outputs, self.targets)]).mean()
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
        return step.seconds


def soft_fraction(engine: Calibrator) -> float:
    layers = engine.layers.values()
    return sum(l.num_soft for l in layers) / max(sum(l.num_subvectors for l in layers), 1)




def profile_table(step: CalibrationStep, batch, steps: int, top: int) -> str:
    """``torch.profiler`` over ``steps`` calibration steps: our regions, then the top aten ops."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1
    ours = [e for e in events if e.key in REGIONS or e.key.startswith(("vq4dit::", "autograd::engine::evaluate_function: VQ"))]
    lines = ["| region / op | calls per step | ms per step | share of step |", "|---|---|---|---|"]
    for e in sorted(ours, key=lambda e: -e.cpu_time_total):
        lines.append(f"| {e.key} | {e.count / steps:.0f} | {e.cpu_time_total / 1e3 / steps:.1f} | "
                     f"{e.cpu_time_total / total:.1%} |")
    lines.append("| *top aten ops by self time* | | | |")
    aten = sorted((e for e in events if e.key.startswith("aten::")), key=lambda e: -e.self_cpu_time_total)
    for e in aten[:top]:
        lines.append(f"| {e.key} | {e.count / steps:.0f} | {e.self_cpu_time_total / 1e3 / steps:.1f} | "
                     f"{e.self_cpu_time_total / total:.1%} |")
    return "\n".join(lines)


def run_case(name: str, source: str, bits: int, args, recipe: str = "quality") -> dict:
    """Median seconds of ``args.repeats`` calibration steps of ``recipe`` at ``bits`` and of the FP
    steps, per region, and the student build's preparation seconds."""
    torch.manual_seed(0)
    teacher = load_dit(source)
    batch = make_batch(teacher)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if args.precision == "bf16-mixed" \
        else contextlib.nullcontext
    # FP copies of the float32 teacher before the student exists (and before any timing hook)
    finetune = {opt: FineTuneStep(teacher, batch, opt, autocast) for opt in args.fp_optimizers}
    with Timer() as built:  # the batch holds its null labels already: guidance 1
        engine = build_engine(teacher, recipe, bits, args.statistics_items, {"teacher_dtype": args.teacher_dtype},
                              num_candidates=args.num_candidates, kmeans_iters=args.kmeans_iters)
    calibration = CalibrationStep(engine, CandidatePruning(every_n_steps=1), autocast)
    if args.pre_harden:
        for layer in engine.layers.values():  # a later calibration state: some rows already hard
            soft = layer.num_soft
            logits = layer.candidate_logits.data.clone()
            logits[: int(soft * args.pre_harden), 0] = 1e4
            layer.candidate_logits.data = logits
            layer.harden_rows_(0.99)
        calibration.optimizer = engine.make_optimizer()
    times = {"calibration": [], **{f"fp-{opt}": [] for opt in finetune}}
    for repeat in range(args.repeats + args.warmup):
        for key, step in (("calibration", calibration), *((f"fp-{o}", s) for o, s in finetune.items())):
            seconds = step(batch)
            if repeat >= args.warmup:
                times[key].append(seconds)
        if repeat == args.warmup - 1:
            calibration.timer.seconds.clear()
    median = {key: statistics.median(values) for key, values in times.items()}
    regions = {k: v / args.repeats for k, v in calibration.timer.seconds.items()}
    result = {"case": name, "bits": bits, "recipe": LABELS[recipe], "median": median, "regions": regions,
              "soft": soft_fraction(engine), "build_s": built.seconds, "prep": dict(engine.phase_seconds),
              "moments_mb": full_moment_bytes(engine) / 2**20}
    if args.profile:
        result["profile"] = profile_table(calibration, batch, args.profile_steps, args.top)
    return result


def _plain_soft_mix(codebook, index, candidate_logits):
    """``vq4dit.soft._soft_mix`` in plain ops (no wide-row views: they pin the shapes), for Inductor
    to fuse into one loop that never writes ``[S, n, d]``."""
    ratios = torch.softmax(candidate_logits.float(), dim=1).to(codebook.dtype)  # [S, n]
    return (codebook[index.long()] * ratios.unsqueeze(-1)).sum(1)


def _plain_soft_logits_grad(grad_soft, codebook, index, candidate_logits):
    """``vq4dit.soft._soft_logits_grad`` in plain ops (see ``_plain_soft_mix``)."""
    ratios = torch.softmax(candidate_logits.float(), dim=1)  # [S, n]
    dratio = (codebook[index.long()] * grad_soft.unsqueeze(1)).sum(-1).float()  # [S, n]
    return (ratios * (dratio - (ratios * dratio).sum(1, keepdim=True))).to(candidate_logits.dtype)


def compile_soft_path() -> None:
    """Swap ``torch.compile(dynamic=True)`` versions into the soft reconstruction's forward and
    logits gradient (S changes per layer and as rows harden: one dynamic-shape graph each)."""
    from vq4dit import soft

    soft._soft_mix = torch.compile(_plain_soft_mix, dynamic=True)
    soft._soft_logits_grad = torch.compile(_plain_soft_logits_grad, dynamic=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["S", "XL-block"], choices=["S", "XL-block"])
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="calibration recipes, one row each (quality: the default)")
    parser.add_argument("--statistics-items", type=int, default=16,
                        help="random items (+ null copies) of the default recipe's input statistics "
                             "(a fit: up to 1024)")
    parser.add_argument("--num-candidates", type=int, default=2)
    parser.add_argument("--kmeans-iters", type=int, default=5, help="k-means quality does not change step time")
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    parser.add_argument("--teacher-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fp-optimizers", nargs="+", default=["rmsprop", "adamw"], choices=["rmsprop", "adamw"])
    parser.add_argument("--repeats", type=int, default=5, help="timed steps of each kind (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--pre-harden", type=float, default=0.0,
                        help="harden this fraction of every layer's rows first (a later calibration state)")
    parser.add_argument("--profile", action="store_true", help="torch.profiler breakdown of calibration steps")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--top", type=int, default=12, help="aten ops listed in the profile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the soft reconstruction (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.compile:
        compile_soft_path()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"S": ("DiT-S/2-256", "DiT-S/2-256"), "XL-block": ("DiT-XL/2 block", None)}
        for case in args.cases:
            name, source = sources[case]
            if source is None:
                source = xl_block_folder(f"{tmp}/xl_block")
            for bits in args.bits:
                for recipe in args.recipes:
                    results.append(run_case(name, source, bits, args, recipe))
                    print(f"done: {name} w{bits} {LABELS[recipe]}", file=sys.stderr, flush=True)

    fp_keys = [f"fp-{o}" for o in args.fp_optimizers]
    print("\n" + machine_line(
        f"precision {args.precision}", f"teacher {args.teacher_dtype}", f"n={args.num_candidates}",
        "soft reconstruction torch.compile'd" if args.compile else "", f"batch {2 * ITEMS} (4 classes + 4 null)",
        f"median of {args.repeats}", f"{args.pre_harden:.0%} of rows hardened first" if args.pre_harden else "") + "\n")
    print(markdown_table(
        ["model", "bits", "recipe", "calibration step s", *(f"FP step s ({k[3:]})" for k in fp_keys),
         *(f"ratio vs {k[3:]}" for k in fp_keys), "soft rows after"],
        [[r["case"], r["bits"], r["recipe"], f"{r['median']['calibration']:.3f}",
          *(f"{r['median'][k]:.3f}" for k in fp_keys),
          *(f"{r['median']['calibration'] / r['median'][k]:.2f}x" for k in fp_keys), f"{r['soft']:.1%}"]
         for r in results]))
    print(f"\nStudent build (Calibrator.build; statistics over {args.statistics_items} items + null copies, "
          f"{args.kmeans_iters} Lloyd iterations)\n")
    phases = ("statistics", "kmeans", "feedback")
    print(markdown_table(
        ["model", "bits", "recipe", "build s", *(f"{p} s" for p in phases), "E[x x^T] held MB"],
        [[r["case"], r["bits"], r["recipe"], f"{r['build_s']:.2f}", *(f"{r['prep'].get(p, 0.0):.2f}" for p in phases),
          f"{r['moments_mb']:.1f}"] for r in results]))
    print("\nWhere a calibration step goes (mean s per step; student forward includes the soft reconstruction)\n")
    print(markdown_table(
        ["model", "bits", "recipe", *REGIONS, "rest"],
        [[r["case"], r["bits"], r["recipe"], *(f"{r['regions'].get(k, 0.0):.3f}" for k in REGIONS),
          f"{r['median']['calibration'] - sum(r['regions'].get(k, 0.0) for k in REGIONS):.3f}"] for r in results]))
    for r in results:
        if "profile" in r:
            print(f"\nProfile: {r['case']} w{r['bits']} {r['recipe']}, {args.profile_steps} calibration steps\n")
            print(r["profile"])


if __name__ == "__main__":
    main()
