"""The shipped RGB reference DiT: 16x16 patches of natural photos, 8 classes, with its classifier.

The second model of the reference suite (issue 17): wider and deeper than the digits model and on RGB
natural-image statistics, so VQ settings tuned on one model are checked on another. Data: the two
photos bundled with scikit-learn (``load_sample_images``: ``china.jpg``, ``flower.jpg``, 427x640),
offline. A class is a region of one photo at one scale (:data:`REGIONS`); samples are all 16x16
patches of the region on a stride grid.

``vq4dit/assets/rgb_reference/`` holds ``transformer/`` (FP16 EMA weights, a diffusers
``DiTTransformer2DModel`` of the same family as the digits model: adaLN-Zero, learned sigma,
1000-entry label table + null class 1000), ``classifier.*`` (a 3-channel
:class:`~vq4dit.reference.DigitsClassifier` whose ``features`` serve the FID) and ``training.json``.
Load with ``load_dit(RGB_REFERENCE_NAME)`` or :func:`load_rgb_reference_model`. Training:
``python tools/train_rgb_reference.py train``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .reference import DigitsClassifier, disable_label_dropout_, load_reference_classifier

__all__ = ["RGB_ASSETS_DIR", "RGB_NUM_CLASSES", "RGB_REFERENCE_NAME", "REGIONS", "load_rgb_reference_classifier",
           "load_rgb_reference_model", "rgb_patches_dataset", "rgb_patches_split"]

RGB_REFERENCE_NAME = "rgb_reference"
RGB_ASSETS_DIR = Path(__file__).resolve().parent / "assets" / RGB_REFERENCE_NAME

# class -> (description, [(photo, downscale factor, (x0, y0, x1, y1) box in the downscaled photo)], stride)
REGIONS: dict[int, tuple[str, list[tuple[str, int, tuple[int, int, int, int]]], int]] = {
    0: ("china sky", [("china", 2, (170, 0, 320, 60))], 2),
    1: ("china pagoda", [("china", 2, (50, 30, 160, 175))], 2),
    2: ("china lake", [("china", 2, (175, 105, 270, 150))], 1),
    3: ("china trees", [("china", 2, (170, 155, 320, 213))], 2),
    4: ("flower petals", [("flower", 2, (100, 55, 210, 165))], 2),
    5: ("flower background", [("flower", 2, (0, 0, 85, 213)), ("flower", 2, (230, 0, 320, 120))], 3),
    6: ("china pagoda, full resolution", [("china", 1, (100, 60, 320, 350))], 5),
    7: ("china left tree", [("china", 2, (0, 95, 45, 213))], 1),
}
RGB_NUM_CLASSES = len(REGIONS)


def _photos() -> dict[tuple[str, int], torch.Tensor]:
    """The two sklearn photos ``[3, H, W]`` in [-1, 1] at every downscale factor REGIONS uses."""
    from sklearn.datasets import load_sample_images

    bundle = load_sample_images()
    photos = {}
    for filename, image in zip(bundle.filenames, bundle.images):
        name = Path(filename).stem
        full = torch.tensor(image).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, 427, 640]
        for factor in sorted({f for _, boxes, _ in REGIONS.values() for n, f, _ in boxes if n == name}):
            size = (full.shape[2] // factor, full.shape[3] // factor)
            photos[name, factor] = full[0] if factor == 1 else F.interpolate(full, size=size, mode="area")[0]
    return photos


def rgb_patches_dataset(size: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All patches of :data:`REGIONS`.

    Returns:
        ``images`` float32 ``[N, 3, size, size]`` in [-1, 1], ``labels`` int64 ``[N]`` and ``band``
        int64 ``[N]``: the patch's row band ``((y - y0) // size) % 4`` inside its box (the split key).
    """
    photos = _photos()
    images, labels, bands = [], [], []
    for label, (_, boxes, stride) in REGIONS.items():
        for name, factor, (x0, y0, x1, y1) in boxes:
            photo = photos[name, factor]
            for y in range(y0, y1 - size + 1, stride):
                for x in range(x0, x1 - size + 1, stride):
                    images.append(photo[:, y : y + size, x : x + size])
                    labels.append(label)
                    bands.append(((y - y0) // size) % 4)
    return torch.stack(images).clamp(-1.0, 1.0), torch.tensor(labels), torch.tensor(bands)


def rgb_patches_split(bands: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier ``(train_indices, test_indices)``: band 0 of every box is held out (rows of patches
    interleaved through each region; neighbouring bands overlap by less than one patch)."""
    return (bands != 0).nonzero().flatten(), (bands == 0).nonzero().flatten()


def load_rgb_reference_model(path: str | Path = RGB_ASSETS_DIR):
    """The RGB reference ``DiTTransformer2DModel`` in eval mode, float32, CPU, label dropout off."""
    from .models import load_dit

    return disable_label_dropout_(load_dit(Path(path) / "transformer", dtype=torch.float32))  # stored FP16


def load_rgb_reference_classifier(path: str | Path = RGB_ASSETS_DIR) -> DigitsClassifier:
    """The RGB reference's 3-channel patch classifier in eval mode."""
    return load_reference_classifier(path)
