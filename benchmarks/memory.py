"""Calibration memory on DiT-XL/2: a real 2-step smoke run per bit-width, and a GPU estimate.

Part 1 runs the real calibration path (``CalibrationModule`` + ``CalibrationDataModule`` +
``pl.Trainer`` with ``CandidatePruning``, ``CalibrationStop`` and ``FinalAssignment``) on the
random-init ``DiT-XL/2-256`` preset with the smallest data settings (1 trajectory, 1 class + its
null label, 2 sampling steps, 2 optimisation steps), once per bit-width and recipe (``--recipes``:
the default, whose build gathers the input statistics from the trajectories' items and holds the
full ``E[x x^T]`` of every error-feedback layer, and the paper's), each in a subprocess
under ``/usr/bin/time -v`` (peak RSS). The child records wall time and RSS per phase (teacher
load, trajectory generation, k-means + student, each step, export); the peak of each phase is the
largest ``VmRSS`` a sampling thread of the child saw (every 10 ms; a sub-10-ms spike can be missed:
the whole-run peak is ``time -v``'s, never reset). A watchdog kills a child whose RSS passes
``--rss-limit-gb`` (the machine is shared).

Part 2 estimates the memory of one calibration step on one 80 GB GPU at the paper's batch
(4 classes + 4 null labels, bf16-mixed) per component, from the real tensor sizes the child
measured: parameters and buffers of teacher and student, optimizer state, and every tensor
autograd saved for the backward (captured with ``saved_tensors_hooks`` during step 1); and the
student build's own peak (the fp32 teacher and the statistics' ``E[x x^T]``, before the steps).

    python -m benchmarks.memory                        # w2 and w3, both recipes (k-means dominates: ~10-20 min each)
    python -m benchmarks.memory --bits 3 --kmeans-iters 0   # quick memory check, no Lloyd iterations
    python -m benchmarks.memory --model tiny --recipes quality --kmeans-iters 0   # a smoke run (seconds)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import machine_line, markdown_table
from benchmarks.proc_memory import available_gb, descendants, status_kb
from benchmarks.recipe_configs import LABELS, RECIPES

ROOT = Path(__file__).resolve().parents[1]

GB = 1e9
PAPER_BATCH = 8  # 4 classes + 4 null labels
XL_TRAJECTORIES = (100, 4, 50)  # configs/dit_xl2.yaml: trajectories, classes, steps


# ------------------------------------------------------------------------------------- child


def _child(args: argparse.Namespace) -> None:
    """One smoke calibration; writes phases and component sizes to ``args.json``."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    import pytorch_lightning as pl

    from benchmarks.recipe_configs import full_moment_bytes
    from callbacks import CalibrationStop, CandidatePruning, FinalAssignment
    from vq4dit.lightning import CalibrationDataModule, CalibrationModule
    from vq4dit.layers import VQLinear

    phases: list[dict] = []
    last = [start]
    # The peak RSS of the current phase, sampled. (Resetting VmHWM through /proc/self/clear_refs
    # would also reset the peak that /usr/bin/time -v reports: it reads the same counter.)
    phase_peak_kb = [0]

    def sample_rss() -> None:
        while True:
            phase_peak_kb[0] = max(phase_peak_kb[0], status_kb("self", "VmRSS"))
            time.sleep(0.01)

    threading.Thread(target=sample_rss, daemon=True).start()

    def mark(name: str) -> None:
        now, rss_kb = time.perf_counter(), status_kb("self", "VmRSS")
        phases.append({"phase": name, "seconds": now - last[0], "rss_gb": rss_kb * 1024 / GB,
                       "peak_gb": max(phase_peak_kb[0], rss_kb) * 1024 / GB})
        last[0], phase_peak_kb[0] = now, rss_kb
        print(f"[memory child] {name}: {json.dumps(phases[-1])}", flush=True)

    def nbytes(tensors) -> int:
        return sum(t.numel() * t.element_size() for t in tensors)

    class Recorder(pl.Callback):
        """Phase marks, real tensor sizes, and the tensors autograd saves during step 1."""

        def __init__(self) -> None:
            self.sizes: dict[str, float] = {}
            self.saved: dict[int, tuple[int, str]] = {}
            self.hooks = None
            self.steps = 0

        def setup(self, trainer, pl_module, stage) -> None:
            mark("trajectories")
            items = trainer.datamodule.train_items
            self.sizes["trajectory_item_bytes"] = nbytes(items.values()) / max(items["t"].numel(), 1)

        def on_fit_start(self, trainer, pl_module) -> None:
            mark("k-means + student")
            teacher, student = pl_module.teacher, pl_module.student
            teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
            layers = [m for m in student.modules() if isinstance(m, VQLinear)]
            vq_ids = {id(t) for m in layers for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))}
            rest = [t for t in (*student.parameters(), *student.buffers()) if id(t) not in vq_ids]
            self.sizes.update(
                teacher_params=sum(p.numel() for p in teacher.parameters()),
                teacher_bytes=nbytes(teacher.parameters()),
                quantized_weights=sum(m.in_features * m.out_features for m in layers),
                student_other_bytes=nbytes(t for t in rest if t.data_ptr() not in teacher_ptrs),
                student_other_shared_bytes=nbytes(t for t in rest if t.data_ptr() in teacher_ptrs),
                codebooks=nbytes(m.codebook for m in layers),
                codes=nbytes(m.codes for m in layers),
                soft_rows=nbytes(m.soft_rows for m in layers),
                candidates=nbytes(m.candidates for m in layers),
                candidate_logits=nbytes(m.candidate_logits for m in layers),
                biases=nbytes(m.bias for m in layers if m.bias is not None),
                num_blocks=len(student.transformer_blocks),
                hidden=student.config.num_attention_heads * student.config.attention_head_dim,
                tokens=(student.config.sample_size // student.config.patch_size) ** 2,
            )
            self.layer_shapes = {(m.out_features, m.in_features) for m in layers}
            self.logit_shapes = {tuple(m.candidate_logits.shape) for m in layers}
            moments = pl_module.engine.input_moments or {}
            self.sizes.update(
                prep_seconds=dict(pl_module.engine.phase_seconds),
                full_moments=full_moment_bytes(pl_module.engine),  # held during the build, freed after it
                diagonal_moments=nbytes(m.diagonal for m in moments.values()),  # kept by the engine
            )
            self.sizes["teacher_dtype"] = str(next(teacher.parameters()).dtype)
            self.sizes["precision"] = str(trainer.precision)
            self.own = {t.untyped_storage().data_ptr() for t in (*pl_module.parameters(), *pl_module.buffers())}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if self.steps == 0:
                self.sizes["model_batch"] = 2 * batch[0].shape[0]  # + null labels (guidance > 1)

                def pack(tensor):
                    storage = tensor.untyped_storage()
                    ptr = storage.data_ptr()
                    if ptr not in self.own and ptr not in self.saved:
                        shape = tuple(tensor.shape)
                        kind = ("weights" if shape in self.layer_shapes else
                                "ratios" if shape in self.logit_shapes else "activations")
                        self.saved[ptr] = (storage.nbytes(), kind)
                    return tensor

                self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
                self.hooks.__enter__()

        def on_before_backward(self, trainer, pl_module, loss) -> None:
            if self.hooks is not None:
                self.hooks.__exit__(None, None, None)
                self.hooks = None
                for kind in ("weights", "ratios", "activations"):
                    self.sizes[f"saved_{kind}"] = sum(n for n, k in self.saved.values() if k == kind)

        def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
            if self.steps == 0:
                self.sizes["logit_grads"] = nbytes(
                    p.grad for group in optimizer.param_groups for p in group["params"]
                    if p.grad is not None and group.get("name") == "ratio_logits"
                )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.steps += 1
            if self.steps == 1:
                optimizer = trainer.optimizers[0]
                self.sizes["optimizer_state_after_step1"] = nbytes(
                    value for state in optimizer.state.values() for value in state.values()
                    if torch.is_tensor(value) and value.dim() > 0
                )
            mark(f"step {self.steps}")

        def on_fit_end(self, trainer, pl_module) -> None:
            mark("final assignment + export")

    with tempfile.TemporaryDirectory() as tmp:
        module = CalibrationModule(
            model=args.model, recipe=args.recipes[0], export={"dir": f"{tmp}/packed"},
            vq={"bits": args.bits[0], "num_candidates": args.num_candidates, "kmeans_iters": args.kmeans_iters},
            calibration={"teacher_dtype": args.teacher_dtype} if args.teacher_dtype else {},
        )
        mark("load teacher")
        data = CalibrationDataModule(
            num_trajectories=1, classes_per_trajectory=1, batch_size=1, num_steps=args.steps, guidance_scale=4.0,
            val_trajectories=0, shuffle=False,
        )
        recorder = Recorder()
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, precision=args.precision, max_epochs=args.steps, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
            num_sanity_val_steps=0, default_root_dir=tmp,
            callbacks=[CandidatePruning(), CalibrationStop(max_steps=args.steps), FinalAssignment(), recorder],
        )
        trainer.fit(module, datamodule=data)
    result = {"phases": phases, "sizes": recorder.sizes, "steps": trainer.global_step,
              "wall_s": time.perf_counter() - start}
    Path(args.json).write_text(json.dumps(result, indent=1))


# ------------------------------------------------------------------------------------ parent


def _run_child(args: argparse.Namespace, bits: int, recipe: str) -> dict:
    """Run one smoke calibration of ``recipe`` under ``/usr/bin/time -v`` with an RSS watchdog."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [
            "/usr/bin/time", "-v", sys.executable, "-m", "benchmarks.memory", "--child", "--json", str(out), "--bits", str(bits),
            "--recipes", recipe, "--model", args.model, "--kmeans-iters", str(args.kmeans_iters), "--steps", str(args.steps),
            "--precision", args.precision, "--threads", str(args.threads), "--num-candidates", str(args.num_candidates),
            *(["--teacher-dtype", args.teacher_dtype] if args.teacher_dtype else []),
        ]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONWARNINGS="ignore")
        log_path = Path(tmp) / "child.log"
        with open(log_path, "w") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            killed, max_seen = None, 0.0
            while process.poll() is None:
                rss = sum(status_kb(pid, "VmRSS") for pid in descendants(process.pid)) * 1024 / GB
                max_seen = max(max_seen, rss)
                if rss > args.rss_limit_gb or available_gb() < args.min_free_gb:
                    killed = f"killed by the watchdog at RSS {rss:.1f} GB (free {available_gb():.1f} GB)"
                    os.killpg(process.pid, signal.SIGKILL)  # our own child's process group only
                    process.wait()
                    break
                time.sleep(0.5)
        text = log_path.read_text()
        if args.verbose:
            print(text)
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
        result = json.loads(out.read_text()) if out.exists() else {"phases": [], "sizes": {}}
        if not result["phases"]:  # killed or failed: the phases it printed so far
            result["phases"] = [json.loads(m) for m in re.findall(r"\[memory child\] [^:]+: (\{.*\})", text)]
        result["peak_rss_gb"] = int(peak.group(1)) * 1024 / GB if peak else max_seen
        errors = [line for line in text.splitlines() if re.match(r"\w*(Error|Exception)\b", line)]
        failed = None if process.returncode == 0 else f"exit {process.returncode}: {errors[-1] if errors else 'see --verbose'}"
        result["failed"] = killed or failed
        return result


def gpu_estimate(sizes: dict) -> list[tuple[str, str, float, str]]:
    """Per-component GB of one calibration step on one GPU at the paper batch, bf16-mixed.

    Rows are ``(component, when, GB, note)``; ``when`` is ``host`` (in host RAM), ``always`` (held for the whole run),
    ``forward`` (saved by autograd, alive from the forward to the backward) or ``backward``
    (created by the backward while the saved tensors are freed). Scaled from the tensors the smoke
    child measured at batch ``model_batch``: activations scale with the batch (and halve when the
    child ran in float32); the dense weights F.linear saves for its backward are bf16 copies under
    autocast. ``CalibrationModule.optimizer_step`` frees the gradients right after the step, so
    they are not alive in the next forward.
    """
    fp32_run = "bf16" not in sizes["precision"]
    scale = PAPER_BATCH / sizes["model_batch"] / (2 if fp32_run else 1)
    blocks = sizes["num_blocks"]
    activations = sizes["saved_activations"] * scale
    teacher_outputs = blocks * PAPER_BATCH * sizes["tokens"] * sizes["hidden"] * 2
    teacher_bf16 = sizes["teacher_params"] * 2
    rows = [
        ("teacher weights (bf16; float32 doubles this)", "always", teacher_bf16,
         f"{sizes['teacher_params'] / 1e6:.1f} M params"),
        ("student weights not quantized", "always", sizes["student_other_bytes"],
         f"float32; shared with a float32 teacher ({sizes['student_other_shared_bytes'] / GB:.2f} GB shared here)"),
        ("codebooks + biases", "always", sizes["codebooks"] + sizes["biases"], ""),
        ("codes", "always", sizes["codes"], "smallest integer dtype"),
        ("soft_rows (int32)", "always", sizes["soft_rows"], "every row soft at the start"),
        ("candidates", "always", sizes["candidates"], ""),
        ("candidate_logits (fp32)", "always", sizes["candidate_logits"], ""),
        ("RMSprop square_avg", "always", sizes["candidate_logits"], "same shape as the logits"),
        ("tensors saved by the ratio regulariser", "forward", sizes["saved_ratios"],
         "logit_regularizer keeps only the logits"),
        ("dense weights saved by F.linear (bf16)", "forward", sizes["saved_weights"] / (2 if fp32_run else 1),
         "one per quantized layer"),
        (f"student activations, all {blocks} blocks", "forward", activations,
         f"block_inputs student keeps every block: {activations / blocks / GB:.3f} GB per block"),
        ("teacher block outputs (bf16)", "forward", teacher_outputs, "kept for the block losses"),
        ("logit gradients", "backward", sizes["candidate_logits"], "freed right after the optimizer step"),
        ("input moments E[x^2] kept by the engine", "host", sizes.get("diagonal_moments", 0),
         "activation-aware layers; host RAM, not in the GPU peak"),
    ]
    return [(name, when, value / GB, note) for name, when, value, note in rows]


def build_estimate(sizes: dict) -> float:
    """GB on the GPU while the student is built (before any step): the float32 teacher (the statistics
    and k-means run before ``teacher_dtype`` applies) and the float32 ``E[x x^T]`` of every
    error-feedback layer, accumulated on the teacher's device during the statistics."""
    return (sizes["teacher_params"] * 4 + sizes.get("full_moments", 0)) / GB


def estimate_peak(rows: list[tuple[str, str, float, str]]) -> float:
    """Peak GB: what is always held plus the larger of the forward's saved tensors and the
    backward's gradients (the backward frees saved tensors as it creates gradients; taking the
    larger of the two, not their sum, assumes the gradients of the last layers arrive after most
    activations are gone, which holds for the logits: they are created layer by layer)."""
    total = {when: sum(gb for _, w, gb, _ in rows if w == when) for when in ("always", "forward", "backward")}
    return total["always"] + max(total["forward"], total["backward"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--model", default="DiT-XL/2-256")
    parser.add_argument("--num-candidates", type=int, default=2)
    parser.add_argument("--kmeans-iters", type=int, default=25, help="Lloyd iterations (library default 25)")
    parser.add_argument("--steps", type=int, default=2, help="sampling steps = optimisation steps")
    parser.add_argument("--precision", default="bf16-mixed", help="Trainer precision (the XL configs: bf16-mixed)")
    parser.add_argument("--teacher-dtype", default="bfloat16", help="CalibrationModule teacher_dtype (XL configs: bfloat16)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=RECIPES,
                        help="calibration recipes, one run each (quality: the default, with its input statistics "
                             "and error feedback; paper: the README table's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss-limit-gb", type=float, default=21.0, help="watchdog: kill the child above this RSS")
    parser.add_argument("--min-free-gb", type=float, default=0.8, help="watchdog: kill the child below this free RAM")
    parser.add_argument("--verbose", action="store_true", help="print the child's log")
    parser.add_argument("--save-json", help="also write the raw results here")
    parser.add_argument("--from-json", help="print the tables of results saved by --save-json (no run)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args)
        return

    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        results = {f"w{bits} {LABELS[recipe]}": _run_child(args, bits, recipe)
                   for bits in args.bits for recipe in args.recipes}
    if args.save_json:
        Path(args.save_json).write_text(json.dumps(results, indent=1))
    print(f"\nmodel {args.model}, n={args.num_candidates}, {args.steps} steps, precision {args.precision}, "
          f"kmeans_iters {args.kmeans_iters}, teacher {args.teacher_dtype or 'float32'}, {args.threads} thread(s)\n"
          + machine_line()
          + (f"; MALLOC_MMAP_THRESHOLD_={os.environ['MALLOC_MMAP_THRESHOLD_']}" if "MALLOC_MMAP_THRESHOLD_" in os.environ else "")
          + "\n")
    table = []
    for run, result in results.items():
        seconds = {p["phase"]: p["seconds"] for p in result["phases"]}
        cells = [seconds.get(name) for name in
                 ("load teacher", "trajectories", "k-means + student", "step 1", "step 2", "final assignment + export")]
        prep = result["sizes"].get("prep_seconds", {})
        wall = result.get("wall_s")
        table.append([run, f"{result['peak_rss_gb']:.2f}", "-" if wall is None else f"{wall:.0f}",
                      *("-" if c is None else f"{c:.1f}" for c in cells[:3]),
                      " / ".join(f"{prep.get(p, 0.0):.1f}" for p in ("statistics", "feedback")) if prep else "-",
                      *("-" if c is None else f"{c:.1f}" for c in cells[3:]), result["failed"] or "ok"])
    print(markdown_table(["run", "peak RSS GB (time -v)", "wall s", "load teacher s", "trajectories s",
                          "k-means + student s", "of which statistics / feedback s", "step 1 s", "step 2 s",
                          "export s", "status"], table))
    print("\nRSS per phase (GB): after the phase / peak during the phase\n")
    names = [p["phase"] for p in max((r["phases"] for r in results.values()), key=len)]
    rows = []
    for name in names:
        cells = []
        for result in results.values():
            phase = next((p for p in result["phases"] if p["phase"] == name), None)
            cells += ["-", "-"] if phase is None else [f"{phase['rss_gb']:.2f}", f"{phase['peak_gb']:.2f}"]
        rows.append([name, *cells])
    print(markdown_table(["phase", *(f"{run} {when}" for run in results for when in ("after", "peak"))], rows))

    complete = {b: r["sizes"] for b, r in results.items() if "saved_activations" in r["sizes"]}
    if not complete:
        return
    print(f"\nEstimate for one 80 GB GPU, batch {PAPER_BATCH} (4 classes + 4 null), bf16-mixed, "
          "from the tensor sizes measured above (GB)\n")
    estimates = {b: gpu_estimate(s) for b, s in complete.items()}
    first = next(iter(estimates.values()))
    rows = [[name, when, *(f"{estimate[i][2]:.2f}" for estimate in estimates.values()), note]
            for i, (name, when, _, note) in enumerate(first)]
    rows.append(["**peak** = always + max(forward, backward)", "",
                 *(f"**{estimate_peak(estimate):.2f}**" for estimate in estimates.values()), ""])
    print(markdown_table(["component", "alive", *estimates, "note"], rows))
    print("\nStudent build on the GPU, before the steps (fp32 teacher + the statistics' E[x x^T]): "
          + ", ".join(f"{run} {build_estimate(sizes):.2f} GB ({sizes.get('full_moments', 0) / GB:.2f} GB of moments)"
                      for run, sizes in complete.items()))
    sizes = next(iter(complete.values()))
    traj = XL_TRAJECTORIES[0] * XL_TRAJECTORIES[1] * XL_TRAJECTORIES[2] * sizes["trajectory_item_bytes"] / GB
    print(f"\nTrajectories stay in host RAM (batches move to the GPU): {traj:.2f} GB for "
          f"{XL_TRAJECTORIES[0]} trajectories x {XL_TRAJECTORIES[1]} classes x {XL_TRAJECTORIES[2]} steps. "
          "Not included: the CUDA context and allocator fragmentation (typically 1-3 GB).")


if __name__ == "__main__":
    main()
