"""save_quantized / load_quantized under faults: disk full, interrupted saves, NaN/Inf, save_pretrained."""

import errno
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline

from tests.test_atomic import age, dead_pid, listing
from tests.test_export import forward, quantized_dit
from tests.test_shared_tensors import with_shared_embedders
from vq4dit import atomic
from vq4dit.atomic import WriteError
from vq4dit.io import QuantizedCheckpointError, load_quantized, save_quantized
from vq4dit.vq_config import VQConfig

CONFIG = VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0)


@pytest.fixture(scope="module")
def model():
    return quantized_dit(CONFIG)


@pytest.fixture(scope="module")
def other():
    torch.manual_seed(1)
    other = quantized_dit(CONFIG)
    with torch.no_grad():
        other.proj_out_2.bias.add_(1.0)
    return other


def leftover_of(target: Path, kind: str, pid: int | None) -> Path:
    tag = f"{atomic._HOST}-{pid}-ab12cd34" if pid is not None else "ab12cd34"
    return target.parent / f".{target.name}.{kind}-{tag}"


# ------------------------------------------------------------------------------------ disk full


@pytest.mark.parametrize("where", ["save_file", "fsync"])
def test_disk_full_keeps_the_old_checkpoint_and_leaves_nothing(model, other, tmp_path, monkeypatch, where):
    target = save_quantized(other, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def full(*args, **kwargs):
        if args and isinstance(args[0], dict):  # save_file(tensors, filename): half a file first
            Path(args[1]).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(*(safetensors.torch, "save_file") if where == "save_file" else (os, "fsync"), full)
    for path, overwrite in ((target, True), (tmp_path / "new", False)):
        with pytest.raises(WriteError) as info:
            save_quantized(model, path, overwrite=overwrite)
        assert str(info.value) == f"cannot write {path}: No space left on device"
    assert listing(tmp_path) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# --------------------------------------------------------------------------- interrupted saves


def test_kill_between_the_two_renames_is_recovered_by_load(model, other, tmp_path):
    target = save_quantized(other, tmp_path / "ckpt")
    pid = dead_pid()
    os.rename(target, leftover_of(target, "old", pid))  # killed after the first rename ...
    save_quantized(model, tmp_path / "new")
    os.rename(tmp_path / "new", leftover_of(target, "tmp", pid))  # ... before the second
    assert listing(tmp_path) == sorted(p.name for p in (leftover_of(target, "old", pid), leftover_of(target, "tmp", pid)))
    loaded = load_quantized(target)  # the last complete checkpoint: the old one
    assert torch.equal(forward(loaded), forward(other))
    assert listing(tmp_path) == ["ckpt"]


def test_kill_between_the_two_renames_is_recovered_by_save(model, other, tmp_path):
    target = save_quantized(other, tmp_path / "ckpt")
    os.rename(target, leftover_of(target, "old", dead_pid()))
    with pytest.raises(QuantizedCheckpointError, match="overwrite=True"):  # the old one is back
        save_quantized(model, target)
    save_quantized(model, target, overwrite=True)
    assert torch.equal(forward(load_quantized(target)), forward(model)) and listing(tmp_path) == ["ckpt"]


def test_stale_temporaries_are_removed_live_ones_kept(model, tmp_path):
    target = tmp_path / "ckpt"
    dead, live = leftover_of(target, "tmp", dead_pid()), leftover_of(target, "tmp", os.getppid())
    legacy_new, legacy_old = leftover_of(target, "tmp", None), leftover_of(target, "old", None)
    for folder in (dead, live, legacy_new, legacy_old):
        folder.mkdir()
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"partial")
    age(legacy_old, 2 * atomic.STALE_AFTER_S)
    with pytest.raises(QuantizedCheckpointError, match="already exists"):  # the stale old one is back
        save_quantized(model, target)
    assert listing(target) == ["diffusion_pytorch_model.safetensors"]
    save_quantized(model, target, overwrite=True)
    assert listing(tmp_path) == sorted(["ckpt", live.name, legacy_new.name])


def test_missing_checkpoint_names_a_leftover_it_cannot_restore(model, tmp_path):
    target = save_quantized(model, tmp_path / "ckpt")
    old = leftover_of(target, "old", None)  # unknown writer, recent: may still be running
    os.rename(target, old)
    with pytest.raises(QuantizedCheckpointError, match=rf"no config\.json; an interrupted save left \['{old.name}'\]"):
        load_quantized(target)


def test_read_only_folder_still_loads(model, tmp_path, monkeypatch):
    target = save_quantized(model, tmp_path / "ckpt")
    stale = leftover_of(target, "tmp", dead_pid())
    stale.mkdir()

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(atomic, "recover", read_only)
    monkeypatch.setattr("vq4dit.io.checkpoint.recover", read_only)
    assert torch.equal(forward(load_quantized(target)), forward(model))


# -------------------------------------------------------------------------------------- NaN/Inf


@pytest.mark.parametrize("tensor", ["transformer_blocks.0.attn1.to_q.codebook", "pos_embed.proj.bias"])
def test_nonfinite_tensors_are_refused_unless_allowed(tmp_path, tensor):
    model = quantized_dit(CONFIG)
    with torch.no_grad():
        model.get_parameter(tensor).view(-1)[1] = float("nan")
        model.transformer_blocks[1].attn1.to_k.bias[0] = float("inf")
    names = rf"NaN/Inf values in 2 tensor\(s\): .*{tensor}.*; pass allow_nonfinite=True"
    with pytest.raises(QuantizedCheckpointError, match=names):
        save_quantized(model, tmp_path / "ckpt")
    assert listing(tmp_path) == []
    folder = save_quantized(model, tmp_path / "ckpt", allow_nonfinite=True)
    with pytest.raises(QuantizedCheckpointError, match=rf"^{folder} has {names}"):
        load_quantized(folder)
    loaded = load_quantized(folder, allow_nonfinite=True)
    assert torch.isnan(loaded.get_parameter(tensor)).any()


# ------------------------------------------------------------------------------ save_pretrained


def test_save_pretrained_of_a_shared_embedder_model_writes_it_packed(tmp_path):
    # diffusers' own save_pretrained (no replaced method) asks the vq4dit backend for the packed tensors,
    # which stores tied tensors once (safetensors refuses "tensors that share memory")
    loaded = load_quantized(save_quantized(with_shared_embedders(), tmp_path / "packed"))
    vae = AutoencoderKL(
        block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )
    pipe = DiTPipeline(transformer=loaded, vae=vae, scheduler=DDIMScheduler(), id2label=None)
    pipe.save_pretrained(tmp_path / "pipe")
    assert torch.equal(forward(load_quantized(tmp_path / "pipe" / "transformer")), forward(loaded))
    for share in (True, False):
        load_quantized(tmp_path / "packed", share_identical=share).save_pretrained(tmp_path / f"plain{share}")
        assert torch.equal(forward(load_quantized(tmp_path / f"plain{share}")), forward(loaded))
    assert "save_pretrained" not in vars(loaded) and "push_to_hub" not in vars(loaded)
