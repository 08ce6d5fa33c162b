"""Training and evaluation of the shipped digits reference DiT and classifier (see :mod:`vq4dit.reference`).

The loop, loss, EMA and checkpointing are shared with the other references
(:mod:`tools.diffusion_training`); this file holds the digits data augmentation, the classifier, the
sample-quality check and the command line.

``python tools/train_reference.py train --out vq4dit/assets/reference`` trains both and writes the
artefacts; ``... evaluate`` re-measures the sample class accuracy and redraws ``samples_fp.png``.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vq4dit.reference import (
    ASSETS_DIR,
    NUM_CLASSES,
    DigitsClassifier,
    classifier_accuracy,
    digits_dataset,
    digits_split,
    load_reference_classifier,
    load_reference_model,
    sample_class_accuracy,
)
if __package__ in (None, ""):  # run as `python tools/NAME.py`: the repository root on the path, for tools.*
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.diffusion_training import (  # noqa: F401  (re-exported: tests and the PixArt tool import them here)
    Augment,
    DiTTrainingConfig,
    build_dit,
    hybrid_loss,
    init_dit_weights_,
    train_dit,
)

def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random offset in ``[-max_shift, max_shift]`` per axis.

    Pixels that enter the frame take the background value -1.
    """
    if max_shift == 0:
        return images
    batch, _, height, width = images.shape
    padded = F.pad(images, (max_shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * max_shift + 1, (batch, 2), generator=generator)
    rows = offsets[:, 0, None] + torch.arange(height)  # [B, H]
    cols = offsets[:, 1, None] + torch.arange(width)  # [B, W]
    batch_index = torch.arange(batch)[:, None, None]
    return padded[:, 0][batch_index, rows[:, :, None], cols[:, None, :]][:, None]


# ---------------------------------------------------------------------------------------------
# The digits DiT: its settings and augmentation on the shared loop (tools/diffusion_training.py)
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceConfig(DiTTrainingConfig):
    """Settings of the digits reference DiT: :class:`DiTTrainingConfig` (its defaults are the
    digits model's) plus ``max_shift``, the random shift augmentation in pixels (0 = off)."""

    max_shift: int = 1


def build_transformer(config: ReferenceConfig) -> nn.Module:
    """A freshly initialised learned-sigma, 1-channel DiT (label dropout off, see ``build_dit``)."""
    return build_dit(config, in_channels=1)


def train_transformer(
    config: ReferenceConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: bool = True,
    checkpoint: str | Path | None = None,
) -> tuple[nn.Module, dict]:
    """Train the digits DiT on the shared loop; returns ``(ema_model, stats)`` (EMA in eval mode).

    Args:
        config: architecture and training settings.
        images: ``[N, 1, H, W]`` in [-1, 1].
        labels: ``[N]`` in ``[0, NUM_CLASSES)``.
        progress: show a tqdm bar with the running losses.
        checkpoint: optional resumable training-state file (see :func:`train_dit`).
    """

    def shift(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return random_shift(batch, config.max_shift, generator)

    return train_dit(config, images, labels, augment=shift, checkpoint=checkpoint, progress=progress)


@dataclass
class ClassifierConfig:
    """Architecture and training settings of the digits classifier.

    Args:
        channels: channels of the first conv stage (the second has twice as many).
        feature_dim: width of the penultimate layer returned by ``features``.
        epochs: training epochs over the train split.
        batch_size: images per step.
        lr: AdamW learning rate (cosine-decayed to 0).
        max_shift: random shift augmentation in pixels.
        test_fraction: held-out fraction of the stratified split.
        split_seed: seed of the split (``digits_split``).
        seed: seed of initialisation and batches.
    """

    channels: int = 32
    feature_dim: int = 128
    epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    max_shift: int = 1
    test_fraction: float = 0.2
    split_seed: int = 0
    seed: int = 0


def train_classifier(
    config: ClassifierConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    progress: bool = True,
    split: tuple[torch.Tensor, torch.Tensor] | None = None,
    augment: Augment | None = None,
) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the train split; returns ``(classifier in eval mode, stats)``.

    Args:
        config: classifier settings.
        images: ``[N, C, H, W]`` in [-1, 1] (C = the classifier's input channels).
        labels: ``[N]`` class ids.
        progress: show a tqdm bar.
        split: ``(train_indices, test_indices)``; default the stratified ``digits_split``.
        augment: batch augmentation; default the random shift of ``config.max_shift`` pixels.
    """
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_index, test_index = split if split is not None else digits_split(labels, config.test_fraction,
                                                                           config.split_seed)
    if augment is None:
        def augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            return random_shift(batch, config.max_shift, generator)
    classifier = DigitsClassifier(config.channels, config.feature_dim, num_classes=int(labels.max()) + 1,
                                  size=images.shape[-1], in_channels=images.shape[1])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_index) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    start = time.perf_counter()
    for _ in tqdm(range(config.epochs), disable=not progress, mininterval=5.0, desc="train classifier"):
        classifier.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for batch in order.split(config.batch_size):
            x = augment(images[batch], generator)
            loss = F.cross_entropy(classifier(x), labels[batch], label_smoothing=0.05)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    classifier.eval()
    stats = {
        "wall_seconds": time.perf_counter() - start,
        "train_accuracy": classifier_accuracy(classifier, images[train_index], labels[train_index]),
        "test_accuracy": classifier_accuracy(classifier, images[test_index], labels[test_index]),
        "num_train": len(train_index),
        "num_test": len(test_index),
    }
    return classifier, stats


def save_grid_png(panels: dict[str, torch.Tensor], path: str | Path, columns: int, scale: int = 3) -> None:
    """Write image grids side by side (one titled panel per entry) as a grayscale PNG.

    Args:
        panels: title -> images ``[N, 1, H, W]`` in [-1, 1], row-major, ``columns`` per row.
        path: output file.
        columns: images per row.
        scale: nearest-neighbour upscaling factor.
    """
    from PIL import Image, ImageDraw

    gap, header = 2, 14
    tiles = []
    for title, images in panels.items():
        if len(images) % columns:
            raise ValueError(f"panel {title!r}: {len(images)} images is not a multiple of {columns}")
        pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0]  # [N, H, W]
        rows, (height, width) = len(images) // columns, pixels.shape[1:]
        grid = torch.full((rows * (height + gap) + gap, columns * (width + gap) + gap), 255, dtype=torch.uint8)
        for n, image in enumerate(pixels):
            r, c = divmod(n, columns)
            grid[gap + r * (height + gap):][:height, gap + c * (width + gap):][:, :width] = image
        tile = Image.fromarray(grid.numpy(), mode="L").resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                                             Image.NEAREST)
        canvas = Image.new("L", (tile.width, tile.height + header), 255)
        canvas.paste(tile, (0, header))
        ImageDraw.Draw(canvas).text((4, 1), title, fill=0)
        tiles.append(canvas)
    out = Image.new("L", (sum(t.width for t in tiles) + 8 * (len(tiles) - 1), max(t.height for t in tiles)), 255)
    x = 0
    for tile in tiles:
        out.paste(tile, (x, 0))
        x += tile.width + 8
    out.save(path, optimize=True)


def evaluate(
    out: Path = ASSETS_DIR,
    per_class: int = 50,
    num_steps: int = 100,
    guidance_scales: tuple[float, ...] = (1.0, 1.5, 4.0),
    grid_per_class: int = 8,
    seed: int = 0,
    threads: int = 1,
) -> dict:
    """Sample-quality check of shipped artefacts; writes ``samples_fp.png`` and updates ``training.json``.

    Args:
        out: artefact folder.
        per_class: generated samples per class for the accuracy.
        num_steps: DDPM steps (learned variance).
        guidance_scales: CFG scales to evaluate (1 = no guidance).
        grid_per_class: samples per class (columns) in each PNG panel.
        seed: sampling seed.
        threads: torch CPU threads.
    """
    torch.set_num_threads(threads)
    out = Path(out)
    model, classifier = load_reference_model(out), load_reference_classifier(out)
    results, panels = {}, {}
    for scale in guidance_scales:
        start = time.perf_counter()
        accuracy, images = sample_class_accuracy(model, classifier, per_class, num_steps, scale, seed=seed)
        results[f"cfg_{scale:g}"] = {"class_accuracy": accuracy, "wall_seconds": time.perf_counter() - start}
        print(f"DDPM {num_steps} steps, cfg {scale:g}: class accuracy {accuracy:.4f}", flush=True)
        grid = images.view(NUM_CLASSES, per_class, *images.shape[1:])[:, :grid_per_class]
        panels[f"cfg {scale:g}"] = grid.reshape(-1, *images.shape[1:])
    save_grid_png(panels, out / "samples_fp.png", columns=grid_per_class)
    report = {
        "sampler": f"vq4dit.sampling.sample: DDPM, {num_steps} respaced steps, learned variance, clip_denoised, "
                   "one seed per sample",
        "samples_per_class": per_class,
        "seed": seed,
        "accuracy": results,
        "png": "samples_fp.png: one panel per cfg scale; rows = classes 0-9, "
               f"columns = the first {grid_per_class} samples of each class",
    }
    info_path = out / "training.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    info["sample_quality"] = report
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    return report


def train(
    out: Path = ASSETS_DIR,
    dit: ReferenceConfig = ReferenceConfig(),
    classifier: ClassifierConfig = ClassifierConfig(),
    threads: int = 1,
    run_evaluation: bool = True,
) -> dict:
    """Train the classifier and the reference DiT, write all artefacts to ``out``.

    Args:
        out: artefact folder (``transformer/``, ``classifier.*``, ``training.json``, ``samples_fp.png``).
        dit: reference DiT settings.
        classifier: digits-classifier settings.
        threads: torch CPU threads.
        run_evaluation: afterwards run :func:`evaluate` (sample accuracy and PNG grid).
    """
    import diffusers
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images, labels = digits_dataset(dit.sample_size)

    digits_classifier, classifier_stats = train_classifier(classifier, images, labels)
    print(f"classifier test accuracy {classifier_stats['test_accuracy']:.4f}", flush=True)
    save_file({k: v.contiguous() for k, v in digits_classifier.state_dict().items()}, out / "classifier.safetensors")
    (out / "classifier.json").write_text(json.dumps(
        {"architecture": digits_classifier.architecture(), "training": asdict(classifier),
         "test_accuracy": classifier_stats["test_accuracy"]}, indent=2) + "\n")

    model, dit_stats = train_transformer(dit, images, labels)
    model.save_pretrained(out / "transformer", safe_serialization=True)
    info = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
        "threads": threads,
        "data": "sklearn load_digits, 1797 images, bilinear 8->16 px, [-1, 1]; DiT trains on all images, "
                "the classifier on the stratified train split (digits_split)",
        "dit": {"config": asdict(dit), **dit_stats},
        "classifier": {"config": asdict(classifier), **classifier_stats},
    }
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"DiT trained in {dit_stats['wall_seconds']:.0f} s, final loss {dit_stats['final_loss']:.4f}", flush=True)
    if run_evaluation:
        info["sample_quality"] = evaluate(out, threads=threads)
    return info


def main(args: list[str] | None = None) -> None:
    """``python tools/train_reference.py {train,evaluate} ...``."""
    from jsonargparse import auto_cli

    auto_cli({"train": train, "evaluate": evaluate}, args=args)


if __name__ == "__main__":
    main()
