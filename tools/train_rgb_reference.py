"""Training of the shipped RGB reference DiT and its patch classifier (see :mod:`vq4dit.rgb_reference`).

``python tools/train_rgb_reference.py train`` trains both on the shared loop
(:mod:`tools.diffusion_training`) and writes ``vq4dit/assets/rgb_reference/`` (FP16 transformer,
classifier, ``training.json``); a killed run resumes from ``--checkpoint``. FP sample quality and the
FP-against-FP noise bars: ``python tools/train_rgb_reference.py evaluate``.
"""

from __future__ import annotations

import datetime
import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as `python tools/NAME.py`: the repository root on the path, for tools.*
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.diffusion_training import DiTTrainingConfig, record_noise_bars, spread, train_dit
from tools.train_reference import ClassifierConfig, train_classifier
from vq4dit.rgb_reference import REGIONS, RGB_ASSETS_DIR, rgb_patches_dataset, rgb_patches_split


@dataclass
class RGBReferenceConfig(DiTTrainingConfig):
    """The RGB reference DiT: 192 wide (3 heads x 64), 8 blocks, patch 2 on 16x16x3; sized so that
    ``train_steps`` run in under 50 minutes on one CPU thread (about 2.5 s per step at batch 32)."""

    num_layers: int = 8
    num_attention_heads: int = 3
    attention_head_dim: int = 64
    train_steps: int = 720
    batch_size: int = 32
    lr: float = 8e-4
    warmup_steps: int = 100
    ema_decay: float = 0.99
    ema_start: int = 240


@dataclass
class RGBClassifierConfig(ClassifierConfig):
    """The RGB patch classifier: narrower and fewer epochs than the digits one (12.5k patches)."""

    channels: int = 16
    feature_dim: int = 64
    epochs: int = 6


def random_hflip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image ``[B, C, H, W]`` left-right with probability 1/2."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def train(
    out: Path = RGB_ASSETS_DIR,
    dit: RGBReferenceConfig = RGBReferenceConfig(),
    classifier: RGBClassifierConfig = RGBClassifierConfig(),
    checkpoint: Path = Path("rgb_reference_training.ckpt"),
    threads: int = 1,
    stop_at: int | None = None,
) -> dict:
    """Train the RGB reference DiT (resumable from ``checkpoint``) and its classifier; write ``out``.

    Args:
        out: artefact folder (``transformer/`` in FP16, ``classifier.*``, ``training.json``).
        dit: DiT settings.
        classifier: patch-classifier settings.
        checkpoint: training-state file of the DiT loop (resumed when present, kept afterwards).
        threads: torch CPU threads.
        stop_at: end the DiT's training after this many of ``dit.train_steps`` (see ``train_dit``).
    """
    import diffusers
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels, bands = rgb_patches_dataset(dit.sample_size)

    model, dit_stats = train_dit(dit, images, labels, augment=random_hflip, checkpoint=checkpoint,
                                 checkpoint_every=25, stop_at=stop_at)
    model.to(torch.float16).save_pretrained(out / "transformer", safe_serialization=True)
    print(f"DiT trained in {dit_stats['wall_seconds']:.0f} s, final loss {dit_stats['final_loss']:.4f}", flush=True)

    patch_classifier, classifier_stats = train_classifier(classifier, images, labels,
                                                          split=rgb_patches_split(bands), augment=random_hflip)
    print(f"classifier test accuracy {classifier_stats['test_accuracy']:.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in patch_classifier.state_dict().items()}, out / "classifier.safetensors")
    (out / "classifier.json").write_text(json.dumps(
        {"architecture": patch_classifier.architecture(), "training": asdict(classifier),
         "test_accuracy": classifier_stats["test_accuracy"]}, indent=2) + "\n")

    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {threads} torch thread(s), "
                   "2 cores shared with other jobs",
        "threads": threads,
        "data": f"sklearn load_sample_images (china, flower), {len(images)} patches 16x16x3 in [-1, 1]; "
                "classes = region x scale: " + "; ".join(f"{k} {v[0]}" for k, v in REGIONS.items())
                + ". DiT trains on all patches (random h-flip); the classifier on row bands 1-3 of every "
                  "region, tested on band 0 (rgb_patches_split)",
        "class_counts": torch.bincount(labels).tolist(),
        "dit": {"config": asdict(dit), "stop_at": stop_at, "weights_dtype": "float16", **dit_stats},
        "classifier": {"config": asdict(classifier), **classifier_stats},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def evaluate(
    out: Path = RGB_ASSETS_DIR,
    seeds: tuple[int, ...] = (0, 1, 2),
    per_class: int = 16,
    num_steps: int = 25,
    guidance_scale: float = 1.5,
    real_items: int = 2048,
    threads: int = 1,
) -> dict:
    """FP sample quality and FP-against-FP noise bars; written to ``training.json`` (``noise_bars``).

    For every sampling seed: class accuracy of the samples and FID to ``real_items`` real patches
    (the classifier's features). Between seed pairs: FID of FP samples against FP samples of
    another seed (the floor a quantized model's FID-to-FP is judged against). Prints one table.

    Args:
        out: artefact folder.
        seeds: sampling seeds (sample ``n`` of seed ``s`` uses noise seed ``s * 10^6 + n``).
        per_class: samples per class and seed.
        num_steps: DDPM steps (learned variance, x0 clipped).
        guidance_scale: classifier-free guidance.
        real_items: real patches (evenly strided) of the FID reference.
        threads: torch CPU threads.
    """
    import time

    from vq4dit.metrics import ClassifierFeatures, SampleMetrics
    from vq4dit.rgb_reference import RGB_NUM_CLASSES, load_rgb_reference_classifier, load_rgb_reference_model
    from vq4dit.sampling import SamplerConfig, sample

    torch.set_num_threads(threads)
    out = Path(out)
    model, classifier = load_rgb_reference_model(out), load_rgb_reference_classifier(out)
    images, _, _ = rgb_patches_dataset(model.config.sample_size)
    real = images[torch.linspace(0, len(images) - 1, min(real_items, len(images))).long()]
    features, logits = ClassifierFeatures(classifier, "features"), ClassifierFeatures(classifier, "logits")
    labels = torch.arange(RGB_NUM_CLASSES).repeat_interleave(per_class)
    config = SamplerConfig(num_steps=num_steps, guidance_scale=guidance_scale, clip_denoised=True)
    samples, per_seed = {}, {}
    for seed in seeds:
        start = time.perf_counter()
        samples[seed] = sample(model, labels, [seed * 10**6 + n for n in range(len(labels))], config).clamp(-1, 1)
        metrics = SampleMetrics(features, logits, real_images=(real + 1) / 2, class_accuracy=True)
        metrics.update((samples[seed] + 1) / 2, labels)
        result = metrics.compute()
        per_seed[seed] = {"fid_to_real": result["fid"], "class_accuracy": result["class_accuracy"],
                          "wall_seconds": round(time.perf_counter() - start, 1)}
        print(f"seed {seed}: {per_seed[seed]}", flush=True)
    pairs = {}
    for a, b in zip(seeds, seeds[1:] + seeds[:1]):
        if a == b:
            continue
        metrics = SampleMetrics(features)
        metrics.update((samples[b] + 1) / 2, labels, fp_images=(samples[a] + 1) / 2)
        pairs[f"{a}-{b}"] = metrics.compute()["fid_to_fp"]

    report = {
        "sampler": f"DDPM {num_steps} steps, learned variance, x0 clipped, cfg {guidance_scale:g}",
        "samples_per_seed": len(labels), "real_items": len(real), "features": "the RGB classifier's penultimate layer",
        "per_seed": per_seed,
        "fid_to_real": spread([v["fid_to_real"] for v in per_seed.values()]),
        "class_accuracy": spread([v["class_accuracy"] for v in per_seed.values()]),
        "fp_vs_fp_fid": {"pairs": pairs, **spread(list(pairs.values()))} if pairs else None,
    }
    return record_noise_bars(out, report, ("fid_to_real", "class_accuracy", "fp_vs_fp_fid"))


def main(args: list[str] | None = None) -> None:
    """``python tools/train_rgb_reference.py {train,evaluate} ...``."""
    from jsonargparse import auto_cli

    auto_cli({"train": train, "evaluate": evaluate}, args=args)


if __name__ == "__main__":
    main()
