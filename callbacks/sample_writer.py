"""SampleWriter: ``train.py predict`` writes PNGs and one ``.npz`` like the original DiT's sample_ddp.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from vq4dit.atomic import atomic_path, atomic_write_text


def write_png_atomic(image: np.ndarray, path: Path) -> None:
    """Write ``[H, W, 3]`` uint8 as PNG via a temporary file: never a half-written image."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image).save(tmp, format="PNG")


def npz_from_folder(folder: Path, count: int) -> Path:
    """Collect ``000000.png .. {count-1:06d}.png`` into ``{folder}.npz`` with ``arr_0 [N, H, W, 3]``
    uint8: the layout the ADM / DiT FID evaluator reads (``sample_ddp.py``'s npz)."""
    from PIL import Image

    missing = [i for i in range(count) if not (folder / f"{i:06d}.png").is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} samples missing in {folder} (e.g. {missing[0]:06d}.png)")
    samples = np.stack([np.asarray(Image.open(folder / f"{i:06d}.png").convert("RGB")) for i in range(count)])
    target = folder.with_name(folder.name + ".npz")
    with atomic_path(target) as tmp, open(tmp, "wb") as file:  # a file object: np.savez adds no suffix
        np.savez(file, arr_0=samples)
    return target


class SampleWriter(BasePredictionWriter):
    """Write every predicted sample as ``{output_dir}/{index:06d}.png`` and, at the end, all of them
    as ``{output_dir}.npz`` (``arr_0``: ``[N, H, W, 3]`` uint8) plus ``labels.txt`` (one class per line; a
    text model's prompt index).

    Under DDP every rank writes its own PNGs; rank 0 assembles the npz after a barrier.

    Args:
        output_dir: folder of the PNGs; the npz is written next to it.
        npz: also write the npz.
    """

    def __init__(self, output_dir: str = "outputs/samples", npz: bool = True) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.npz = npz
        self.npz_path: Path | None = None
        self._labels: dict[int, int] = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module) -> None:
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"cannot create sample folder {self.output_dir}: {error}") from error
        self._labels = {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for index, label, image in zip(prediction["index"].tolist(), prediction["labels"].tolist(), prediction["images"]):
            write_png_atomic(image.numpy(), self.output_dir / f"{index:06d}.png")
            self._labels[index] = label

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module) -> None:
        trainer.strategy.barrier()
        gathered = [self._labels]
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            gathered = [None] * trainer.world_size
            torch.distributed.all_gather_object(gathered, self._labels)
        if trainer.is_global_zero:
            labels = {k: v for part in gathered for k, v in part.items()}
            count = len(labels)
            lines = "".join(f"{labels[i]}\n" for i in sorted(labels))
            atomic_write_text(self.output_dir / "labels.txt", lines)
            if self.npz:
                self.npz_path = npz_from_folder(self.output_dir, count)
                rank_zero_info(f"{count} samples: PNGs in {self.output_dir}, npz {self.npz_path}")
            else:
                rank_zero_info(f"{count} samples: PNGs in {self.output_dir}")
        trainer.strategy.barrier()
