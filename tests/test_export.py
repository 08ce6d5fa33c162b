"""Atomic save / strict load of vq4dit checkpoints (bit packing: test_packing.py; sizes: test_size.py)."""

import copy
import json
import math
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from vq4dit import atomic
from vq4dit.atomic import WriteError
from vq4dit.io import FORMAT_VERSION, QuantizedCheckpointError, load_quantized, save_quantized
from vq4dit.io.packed import tensor_digest
from vq4dit.size import size_report
from vq4dit.layers import VQLinear
from vq4dit.quantize import quantize_, vq_layers
from vq4dit.vq_config import VQConfig

CORE = ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")


def block_linears(module, name):
    return name.startswith("transformer_blocks.") and ".norm1.emb." not in name


def tiny_dit():
    return DiTTransformer2DModel(
        sample_size=8, num_layers=2, num_attention_heads=2, attention_head_dim=32, in_channels=4,
        out_channels=8, patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero",
    )


def quantized_dit(config, finalize=True):
    torch.manual_seed(0)
    model = tiny_dit()
    quantize_(model, config, filter_fn=block_linears, progress=False)
    if finalize:
        for layer in vq_layers(model).values():
            layer.finalize_()
    return model.eval()


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny matmuls: intra-op threads only add contention on a busy 2-core machine (~30x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=["k16d4", "k64d2"])
def model(request):
    if request.param == "k16d4":
        return quantized_dit(VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2, kmeans_iters=0))
    return quantized_dit(VQConfig(codebook_size=64, subvector_dim=2, num_candidates=2, kmeans_iters=0))


@pytest.fixture(scope="module")
def saved(model, tmp_path_factory):
    return save_quantized(model, tmp_path_factory.mktemp("ckpt") / "dit-vq")


def forward(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 999])).sample


def copy_ckpt(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):
        (dst / name).write_bytes((src / name).read_bytes())
    return dst


def rewrite_tensors(folder: Path, edit) -> None:
    """Apply ``edit`` to the file's tensors and rewrite it with a valid checksum."""
    file = folder / "diffusion_pytorch_model.safetensors"
    tensors = safetensors.torch.load_file(str(file))
    edit(tensors)
    metadata = {"format": "pt", "vq4dit_sha256": tensor_digest(tensors)}
    safetensors.torch.save_file(tensors, str(file), metadata=metadata)


def edit_config(folder: Path, edit) -> None:
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


# ------------------------------------------------------------------------------- save and load


def test_roundtrip_is_bit_exact(model, saved):
    loaded = load_quantized(saved)
    assert not loaded.training
    assert torch.equal(forward(loaded), forward(model))
    expected = model.state_dict()
    for key, value in loaded.state_dict().items():
        if key.endswith(("soft_rows", "candidates", "candidate_logits")):  # hard: empty soft state
            assert value.numel() == expected[key].numel() == 0, key
            continue
        assert value.dtype == expected[key].dtype and torch.equal(value, expected[key]), key
    assert set(loaded.state_dict()) == set(expected)
    assert set(vq_layers(loaded)) == set(vq_layers(model))


def test_roundtrip_keeps_dtypes(model, tmp_path):
    half = copy.deepcopy(model).to(torch.bfloat16)
    loaded = load_quantized(save_quantized(half, tmp_path / "bf16"))
    layer = loaded.transformer_blocks[0].attn1.to_q
    assert layer.codebook.dtype == layer.bias.dtype == loaded.proj_out_2.weight.dtype == torch.bfloat16
    for key, value in half.state_dict().items():
        if value.numel():
            assert torch.equal(loaded.state_dict()[key], value), key


def test_file_format(model, saved):
    assert sorted(p.name for p in saved.iterdir()) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    config = json.loads((saved / "config.json").read_text())
    assert config["_class_name"] == "DiTTransformer2DModel" and "_diffusers_version" in config
    assert config["num_layers"] == 2 and config["norm_type"] == "ada_norm_zero"
    qc = config["quantization_config"]
    assert qc["quant_method"] == "vq4dit" and qc["format_version"] == 1
    layers = vq_layers(model)
    k = next(iter(layers.values())).config.codebook_size
    assert qc["codebook_size"] == k
    assert set(qc["layers"]) == {f"transformer_blocks.{b}.{n}" for b in range(2) for n in CORE}
    assert qc["layers"]["transformer_blocks.0.ff.net.2"] == {
        "in_features": 256, "out_features": 64, "codebook_size": k,
        "subvector_dim": layers["transformer_blocks.0.ff.net.2"].config.subvector_dim,
        "code_bits": int(math.log2(k)), "bias": True,
    }
    tensors = safetensors.torch.load_file(str(saved / "diffusion_pytorch_model.safetensors"))
    assert not any(key.endswith(("soft_rows", "candidates", "candidate_logits", ".codes")) for key in tensors)
    for name, layer in layers.items():
        assert f"{name}.weight" not in tensors
        packed = tensors[f"{name}.codes_packed"]
        assert packed.dtype == torch.uint8
        assert packed.numel() == math.ceil(layer.num_subvectors * math.log2(k) / 8)
        assert torch.equal(tensors[f"{name}.codebook"], layer.codebook)
    assert torch.equal(tensors["pos_embed.proj.weight"], model.pos_embed.proj.weight)
    # the size report's file estimate is the exact data section of the file
    raw = (saved / "diffusion_pytorch_model.safetensors").read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    assert size_report(model).file_bytes == len(raw) - 8 - header_len


def test_plain_diffusers_refuses_the_folder(saved, tmp_path, monkeypatch):
    # diffusers without vq4dit's backend (what it is before `import vq4dit` registers it)
    from diffusers.quantizers import auto

    monkeypatch.delitem(auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "vq4dit")
    with pytest.raises(ValueError, match="Unknown quantization type, got vq4dit"):
        DiTTransformer2DModel.from_pretrained(saved)
    monkeypatch.undo()
    assert isinstance(DiTTransformer2DModel.from_pretrained(saved).transformer_blocks[0].attn1.to_q, VQLinear)


def test_loaded_model_runs_in_dit_pipeline(saved):
    transformer = load_quantized(saved)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(), id2label=None)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 2], num_inference_steps=2, guidance_scale=4.0, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and images.dtype.kind == "f"
    assert torch.isfinite(torch.from_numpy(images)).all()


def test_extra_config_keys_survive(tmp_path):
    model = quantized_dit(VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0))
    model.register_to_config(calibration_note="w2 run 3")
    loaded = load_quantized(save_quantized(model, tmp_path / "ckpt"))
    assert loaded.config.calibration_note == "w2 run 3"


def test_timestep_freq_shift_is_reapplied(tmp_path):
    # the shift is a module attribute (no tensor): only the config records it
    models = pytest.importorskip("vq4dit.models")
    if not hasattr(models, "apply_timestep_freq_shift"):
        pytest.skip("vq4dit.models has no apply_timestep_freq_shift")
    model = quantized_dit(VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0))
    models.apply_timestep_freq_shift(model, 0)
    loaded = load_quantized(save_quantized(model, tmp_path / "ckpt"))
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in loaded.transformer_blocks)
    assert torch.equal(forward(loaded), forward(model))


# ----------------------------------------------------------------------------- refused saves


def test_soft_model_refuses_to_save(tmp_path):
    model = quantized_dit(VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2, kmeans_iters=0), finalize=False)
    with pytest.raises(QuantizedCheckpointError, match=r"finalize_\(\).*transformer_blocks\.0\.norm1\.linear"):
        save_quantized(model, tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(QuantizedCheckpointError, match="no VQLinear"):
        save_quantized(tiny_dit(), tmp_path / "ckpt")


def test_existing_path_needs_overwrite(model, saved, tmp_path):
    target = copy_ckpt(saved, tmp_path / "ckpt")
    before = (target / "diffusion_pytorch_model.safetensors").read_bytes()
    with pytest.raises(QuantizedCheckpointError, match="overwrite=True"):
        save_quantized(model, target)
    assert (target / "diffusion_pytorch_model.safetensors").read_bytes() == before
    (target / "config.json").write_text("{}")  # make the old one distinguishable
    save_quantized(model, target, overwrite=True)
    assert torch.equal(forward(load_quantized(target)), forward(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left aside
    (target / "notes.txt").write_text("mine")
    with pytest.raises(QuantizedCheckpointError, match="notes.txt"):
        save_quantized(model, target, overwrite=True)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(QuantizedCheckpointError, match="not a directory"):
        save_quantized(model, tmp_path / "a-file", overwrite=True)


def test_interrupted_save_leaves_nothing(model, saved, tmp_path, monkeypatch):
    def crash(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
    # an interrupted overwrite keeps the old checkpoint intact
    old = copy_ckpt(saved, tmp_path / "old")
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert torch.equal(forward(load_quantized(old)), forward(model))


def test_interrupted_swap_restores_the_old_checkpoint(model, saved, tmp_path, monkeypatch):
    # where the OS cannot swap two folders atomically (renameat2 RENAME_EXCHANGE), two renames
    old = copy_ckpt(saved, tmp_path / "old")
    before = (old / "diffusion_pytorch_model.safetensors").read_bytes()
    real_rename = os.rename
    monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)

    def rename(src, dst):
        if Path(src).name.startswith(".old.tmp-"):  # the new folder moving in
            raise KeyboardInterrupt("killed between the two renames")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_quantized(model, old, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]
    assert (old / "diffusion_pytorch_model.safetensors").read_bytes() == before


def test_unwritable_parent(model, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"^cannot write \S+/file/ckpt: \S+/file is not a directory$"):
        save_quantized(model, tmp_path / "file" / "ckpt")
    if os.geteuid() != 0:  # root ignores permission bits
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(WriteError, match="^cannot write .*locked/ckpt: Permission denied$"):
            save_quantized(model, locked / "ckpt")


# ----------------------------------------------------------------------------- refused loads


def test_truncated_and_corrupted_files(saved, tmp_path):
    raw = (saved / "diffusion_pytorch_model.safetensors").read_bytes()
    for i, damaged in enumerate([raw[: len(raw) // 2], raw[:5], raw[:-1]]):
        folder = copy_ckpt(saved, tmp_path / f"cut{i}")
        (folder / "diffusion_pytorch_model.safetensors").write_bytes(damaged)
        with pytest.raises(QuantizedCheckpointError, match="truncated or corrupted"):
            load_quantized(folder)
    folder = copy_ckpt(saved, tmp_path / "flipped")
    flipped = bytearray(raw)
    flipped[-100] ^= 0x10  # a data byte: the header stays valid
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(QuantizedCheckpointError, match="checksum"):
        load_quantized(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(QuantizedCheckpointError, match="no diffusion_pytorch_model.safetensors .*incomplete"):
        load_quantized(folder)


def test_key_and_shape_mismatches_are_named(saved, tmp_path):
    name = "transformer_blocks.1.attn1.to_k"
    cases = {
        "missing": (lambda t: t.pop(f"{name}.codebook"), rf"missing keys: \[{name}\.codebook\]"),
        "unexpected": (lambda t: t.update(extra=torch.zeros(1)), r"unexpected keys: \[extra\]"),
        "dense": (lambda t: t.update({f"{name}.weight": torch.zeros(64, 64)}), rf"unexpected keys: \[{name}\.weight\]"),
        "shape": (lambda t: t.update({f"{name}.bias": torch.zeros(3)}), rf"{name}\.bias \(3,\) != \(64,\)"),
        "other": (lambda t: t.update({"proj_out_2.bias": torch.zeros(5)}), r"proj_out_2\.bias"),
    }
    for case, (edit, message) in cases.items():
        folder = copy_ckpt(saved, tmp_path / case)
        rewrite_tensors(folder, edit)
        with pytest.raises(QuantizedCheckpointError, match=message):
            load_quantized(folder)


def test_bad_configs(saved, tmp_path):
    def layers(c):
        return c["quantization_config"]["layers"]

    ff2 = "transformer_blocks.0.ff.net.2"
    cases = {
        "newer": (lambda c: c["quantization_config"].update(format_version=FORMAT_VERSION + 1), "newer vq4dit"),
        "method": (lambda c: c["quantization_config"].update(quant_method="gptq"), "unknown quant_method 'gptq'"),
        "plain": (lambda c: c.pop("quantization_config"), "not a vq4dit checkpoint"),
        "class": (lambda c: c.update(_class_name="os"), "not a diffusers model class"),
        "arch": (lambda c: c.update(norm_type="bogus"), "cannot build DiTTransformer2DModel"),
        "extra": (lambda c: layers(c).update(proj_out_1=layers(c)[ff2]), "'proj_out_1'.*does not match the model"),
        "bits": (lambda c: layers(c)[ff2].update(code_bits=3), f"'{ff2}': codebook_size"),
        "type": (lambda c: layers(c)[ff2].update(bias="yes"), "bool bias"),
        "dim": (lambda c: layers(c)[ff2].update(subvector_dim=8), r"codes_packed \(\d+,\) != "),
    }
    for case, (edit, message) in cases.items():
        folder = copy_ckpt(saved, tmp_path / case)
        edit_config(folder, edit)
        with pytest.raises(QuantizedCheckpointError, match=message):
            load_quantized(folder)
    with pytest.raises(QuantizedCheckpointError, match="not a vq4dit checkpoint"):
        load_quantized(tmp_path / "empty-does-not-exist")
    plain = tmp_path / "diffusers-folder"
    tiny_dit().save_pretrained(plain)
    with pytest.raises(QuantizedCheckpointError, match="not a vq4dit checkpoint"):
        load_quantized(plain)
