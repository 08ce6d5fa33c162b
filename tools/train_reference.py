"""Training and evaluation of the shipped digits reference DiT and classifier (see :mod:`vq4dit.reference`).

``python tools/train_reference.py train --out vq4dit/assets/reference`` trains both and writes the
artefacts; ``... evaluate`` re-measures the sample class accuracy and redraws ``samples_fp.png``.

The schedule, forward process, posterior and reverse step come from :mod:`vq4dit.sampling`
(``Diffusion(T, T)`` is the full training chain); this module adds only the training-only math of
improved DDPM (Nichol & Dhariwal 2021): the hybrid loss with its Gaussian KL and discretized decoder
likelihood.
"""

from __future__ import annotations

import copy
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
    disable_label_dropout_,
    load_reference_classifier,
    load_reference_model,
    sample_class_accuracy,
)
from vq4dit.sampling import NULL_CLASS, Diffusion

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
# Training-only diffusion math (the schedule and posterior are vq4dit.sampling.Diffusion's)
# ---------------------------------------------------------------------------------------------


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, e^logvar1) || N(mean2, e^logvar2))`` in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + (logvar1 - logvar2).exp() + (mean1 - mean2) ** 2 * (-logvar2).exp())


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of data in [-1, 1] on 256 bins under ``N(mean, e^(2 log_scale))``.

    The end bins extend to -inf / +inf (DDPM's decoder ``L_0``).
    """
    inv_std = (-log_scale).exp()
    upper = inv_std * (x - mean + 1.0 / 255.0)
    lower = inv_std * (x - mean - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X <= x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X >= x - 1/255)
    bin_mass = (torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp_min(1e-12)
    return torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, bin_mass.log()))


def _mean_over_pixels(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1).mean(dim=1)

def hybrid_loss(
    diffusion: Diffusion,
    model_output: torch.Tensor,
    x0: torch.Tensor,
    xt: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample ``(L_simple, L_vlb)`` ``[B]`` of improved DDPM as used by DiT (total loss = their sum).

    ``model_output [B, 2C, H, W]`` = (eps, v); ``t [B]`` are step indices of ``diffusion``.
    ``L_simple = mean (eps - eps_pred)^2``. ``L_vlb`` is the bound term ``L_t`` in bits per pixel:
    ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))`` for t > 0, the decoder NLL for t = 0, computed with a
    stop-gradient on the predicted mean so it trains only the variance. Sampling t uniformly makes
    ``E[L_t] = L_vlb / T``, i.e. the paper's ``lambda = 0.001`` at T = 1000.
    """
    channels = x0.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"expected {2 * channels} output channels (eps, v), got {model_output.shape[1]}")
    eps_pred = model_output[:, :channels]
    mse = _mean_over_pixels((noise - eps_pred) ** 2)
    frozen = torch.cat([eps_pred.detach(), model_output[:, channels:]], dim=1)
    mean, log_variance, _ = diffusion.p_mean_variance(xt, frozen, t, clip_denoised=False)
    true_mean, true_log_variance = diffusion.q_posterior(x0, xt, t)
    kl = _mean_over_pixels(normal_kl(true_mean, true_log_variance, mean, log_variance)) / math.log(2.0)
    nll = -_mean_over_pixels(discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_variance)) / math.log(2.0)
    return mse, torch.where(t == 0, nll, kl)


# ---------------------------------------------------------------------------------------------
# The transformer and its training
# ---------------------------------------------------------------------------------------------


@dataclass
class ReferenceConfig:
    """Architecture and diffusion-training settings of the reference DiT.

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
        max_shift: random shift augmentation in pixels (0 = off).
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
    max_shift: int = 1
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
def init_dit_weights_(model: nn.Module, label_std: float = 0.02) -> nn.Module:
    """DiT's initialisation (from the paper's description), in place.

    Xavier-uniform Linears and patch projection with zero bias, N(0, 0.02) timestep MLPs,
    N(0, label_std) label tables, and zero adaLN-Zero modulations and output layer, so every block
    starts as the identity.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    projection = model.pos_embed.proj
    nn.init.xavier_uniform_(projection.weight.view(projection.weight.shape[0], -1))
    nn.init.zeros_(projection.bias)
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


def build_transformer(config: ReferenceConfig):
    """A freshly initialised learned-sigma, 1-channel DiT (label dropout off, see above)."""
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        in_channels=1,
        out_channels=2,
        num_layers=config.num_layers,
        sample_size=config.sample_size,
        patch_size=config.patch_size,
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero",
    )
    return disable_label_dropout_(init_dit_weights_(model, config.label_init_std))


def _lr_at(step: int, config: ReferenceConfig) -> float:
    """Linear warm-up, then cosine decay from ``lr`` to ``min_lr``."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.train_steps - config.warmup_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def train_transformer(
    config: ReferenceConfig, images: torch.Tensor, labels: torch.Tensor, progress: bool = True
) -> tuple[nn.Module, dict]:
    """Train the reference DiT with the hybrid loss; returns ``(ema_model, stats)`` (EMA in eval mode).

    Args:
        config: architecture and training settings.
        images: ``[N, 1, H, W]`` in [-1, 1].
        labels: ``[N]`` in ``[0, NUM_CLASSES)``.
        progress: show a tqdm bar with the running losses.
    """
    from tqdm import tqdm

    if images.shape[-1] != config.sample_size:
        raise ValueError(f"images are {images.shape[-1]} px, config.sample_size is {config.sample_size}")
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    diffusion = Diffusion(config.num_timesteps, config.num_timesteps)  # full chain: step index = timestep
    model = build_transformer(config).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    history = {"loss": [], "mse": [], "vb": []}
    start = time.perf_counter()
    bar = tqdm(range(config.train_steps), disable=not progress, mininterval=5.0, desc="train DiT")
    for step in bar:
        index = torch.randint(0, len(images), (config.batch_size,), generator=generator)
        x0 = random_shift(images[index], config.max_shift, generator)
        y = labels[index].clone()
        y[torch.rand(config.batch_size, generator=generator) < config.label_dropout] = NULL_CLASS
        t = torch.randint(0, diffusion.num_steps, (config.batch_size,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        xt = diffusion.q_sample(x0, t, noise)

        output = model(xt, timestep=diffusion.timesteps[t], class_labels=y).sample
        mse, vb = hybrid_loss(diffusion, output, x0, xt, t, noise)
        loss = (mse + vb).mean()
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
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
        history["mse"].append(mse.mean().item())
        history["vb"].append(vb.mean().item())
        if step % 50 == 0 or step + 1 == config.train_steps:
            recent = {k: sum(v[-50:]) / len(v[-50:]) for k, v in history.items()}
            bar.set_postfix(loss=f"{recent['loss']:.4f}", mse=f"{recent['mse']:.4f}", vb=f"{recent['vb']:.4f}")
        if progress and (step % 500 == 0 or step + 1 == config.train_steps):
            recent = {k: sum(v[-100:]) / len(v[-100:]) for k, v in history.items()}
            print(
                f"step {step + 1}/{config.train_steps} lr {_lr_at(step, config):.2e} "
                + " ".join(f"{k} {v:.4f}" for k, v in recent.items()),
                flush=True,
            )

    window = min(100, config.train_steps)
    stats = {
        "wall_seconds": time.perf_counter() - start,
        "final_loss": sum(history["loss"][-window:]) / window,
        "final_mse": sum(history["mse"][-window:]) / window,
        "final_vb": sum(history["vb"][-window:]) / window,
        "loss_curve": [round(sum(history["loss"][i : i + 100]) / len(history["loss"][i : i + 100]), 5)
                       for i in range(0, config.train_steps, 100)],
        "num_parameters": sum(p.numel() for p in ema.parameters()),
    }
    return ema, stats


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
    config: ClassifierConfig, images: torch.Tensor, labels: torch.Tensor, progress: bool = True
) -> tuple[DigitsClassifier, dict]:
    """Train the classifier on the train split; returns ``(classifier in eval mode, stats)``."""
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    train_index, test_index = digits_split(labels, config.test_fraction, config.split_seed)
    classifier = DigitsClassifier(config.channels, config.feature_dim, size=images.shape[-1])
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=config.lr, weight_decay=1e-4)
    steps_per_epoch = math.ceil(len(train_index) / config.batch_size)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs * steps_per_epoch)
    start = time.perf_counter()
    for _ in tqdm(range(config.epochs), disable=not progress, mininterval=5.0, desc="train classifier"):
        classifier.train()
        order = train_index[torch.randperm(len(train_index), generator=generator)]
        for batch in order.split(config.batch_size):
            x = random_shift(images[batch], config.max_shift, generator)
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
