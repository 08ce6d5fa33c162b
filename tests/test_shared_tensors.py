"""Identical tensors (the per-block embedder copies of converted DiTs) stored once and tied on load."""

import json
import struct

import pytest
import safetensors.torch
import torch

from tests.dit_reference import random_original_state_dict
from tests.test_export import edit_config, forward, quantized_dit
from vq4dit.io import QuantizedCheckpointError, load_quantized, save_quantized, tie_tensors_
from vq4dit.models import load_dit
from vq4dit.quantize import quantize_, vq_layers
from vq4dit.packing import identical_tensors
from vq4dit.vq_config import VQConfig
from vq4dit.size import size_report

CONFIG = VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0)
EMBEDDER = ("timestep_embedder.linear_1.weight", "timestep_embedder.linear_1.bias",
            "timestep_embedder.linear_2.weight", "timestep_embedder.linear_2.bias",
            "class_embedder.embedding_table.weight")


def with_shared_embedders():
    """A hard-quantized tiny DiT whose blocks hold equal (not the same) embedder copies."""
    model = quantized_dit(CONFIG)
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    with torch.no_grad():
        for block in model.transformer_blocks[1:]:
            for key, value in block.norm1.emb.state_dict().items():
                value.copy_(first[key])
    return model


def big_embedder_keys(model) -> list[str]:
    """The embedder tensors large enough to be shared (>= 1 KiB: the tiny model's biases are not)."""
    emb = model.transformer_blocks[0].norm1.emb.state_dict()
    return [key for key in EMBEDDER if emb[key].numel() * emb[key].element_size() >= 1024]


def data_bytes(folder) -> int:
    raw = (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    return len(raw) - 8 - struct.unpack("<Q", raw[:8])[0]


def test_identical_tensors_finds_equal_content_not_equal_shapes():
    a = torch.arange(512.0)
    tensors = {"blocks.10.w": a.clone(), "blocks.2.w": a.clone(), "blocks.0.w": a + 1, "blocks.3.w": a.view(16, 32),
               "small.1": torch.zeros(4), "small.0": torch.zeros(4), "half": a.to(torch.bfloat16),
               "half2": a.to(torch.bfloat16), "meta.0": torch.empty(512, device="meta"),
               "meta.1": torch.empty(512, device="meta")}
    tensors["meta.2"] = tensors["meta.0"]  # tied: the same tensor
    # natural order: block 2 is the source of block 10; other shapes, other values, tiny tensors and
    # meta tensors (no values) stay, unless they are the same tensor
    assert identical_tensors(tensors) == {"blocks.10.w": "blocks.2.w", "half2": "half", "meta.2": "meta.0"}


def test_equal_embedders_are_stored_once_and_tied_on_load(tmp_path):
    model = with_shared_embedders()
    plain = save_quantized(quantized_dit(CONFIG), tmp_path / "plain")
    shared = save_quantized(model, tmp_path / "shared")
    qc = json.loads((shared / "config.json").read_text())["quantization_config"]
    shared_keys = big_embedder_keys(model)
    assert len(shared_keys) == 3  # both weights and the label table; the 64-float biases stay
    aliases = {f"transformer_blocks.1.norm1.emb.{key}": f"transformer_blocks.0.norm1.emb.{key}" for key in shared_keys}
    assert qc["format_version"] == 2 and qc["tensor_aliases"] == aliases
    stored = safetensors.torch.load_file(str(shared / "diffusion_pytorch_model.safetensors"))
    assert not set(aliases) & set(stored)
    emb = model.transformer_blocks[1].norm1.emb.state_dict()
    embedder_bytes = sum(emb[key].numel() * emb[key].element_size() for key in shared_keys)
    assert data_bytes(plain) - data_bytes(shared) == embedder_bytes  # exactly one copy less
    assert size_report(model).file_bytes == data_bytes(shared)  # the estimate knows it too
    plain_qc = json.loads((plain / "config.json").read_text())["quantization_config"]
    assert plain_qc["format_version"] == 1 and "tensor_aliases" not in plain_qc  # older readers still read it

    loaded = load_quantized(shared)
    blocks = loaded.transformer_blocks
    assert blocks[1].norm1.emb.timestep_embedder.linear_2.weight is blocks[0].norm1.emb.timestep_embedder.linear_2.weight
    assert blocks[1].norm1.emb.class_embedder.embedding_table.weight is blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert len(list(loaded.parameters())) == len(list(model.parameters())) - len(shared_keys)
    assert torch.equal(forward(loaded), forward(model))
    assert loaded.state_dict().keys() == model.state_dict().keys()
    loaded.to(torch.float64)  # conversions keep the tie (one tensor, moved once)
    assert blocks[1].norm1.emb.timestep_embedder.linear_1.weight is blocks[0].norm1.emb.timestep_embedder.linear_1.weight
    assert blocks[1].norm1.emb.timestep_embedder.linear_1.weight.dtype == torch.float64

    apart = load_quantized(shared, share_identical=False)
    w0 = apart.transformer_blocks[0].norm1.emb.timestep_embedder.linear_2.weight
    w1 = apart.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.weight
    assert w0 is not w1 and w0.data_ptr() != w1.data_ptr() and torch.equal(w0, w1)
    assert torch.equal(forward(apart), forward(model))

    resaved = save_quantized(load_quantized(shared), tmp_path / "resaved")  # tied model saves the same file
    assert json.loads((resaved / "config.json").read_text())["quantization_config"]["tensor_aliases"] == aliases
    again = safetensors.torch.load_file(str(resaved / "diffusion_pytorch_model.safetensors"))
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)


def test_converted_original_checkpoint_shares_its_embedders(tmp_path):
    """Conversion copies the original's one embedder into every block: the packed file keeps one."""
    torch.save(random_original_state_dict(hidden=64, depth=3, patch=2, latent=8), tmp_path / "dit.pt")
    model = load_dit(str(tmp_path / "dit.pt"), num_heads=4)
    quantize_(model, CONFIG, progress=False)
    for layer in vq_layers(model).values():
        layer.finalize_()
    folder = save_quantized(model, tmp_path / "packed")
    aliases = json.loads((folder / "config.json").read_text())["quantization_config"]["tensor_aliases"]
    keys = big_embedder_keys(model)
    assert sorted(aliases) == sorted(f"transformer_blocks.{b}.norm1.emb.{k}" for b in (1, 2) for k in keys)
    assert set(aliases.values()) == {f"transformer_blocks.0.norm1.emb.{k}" for k in keys}
    loaded = load_quantized(folder)
    assert torch.equal(forward(loaded), forward(model))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda qc: qc["tensor_aliases"].update({"transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight":
                                                  "pos_embed.proj.weight"}), "stored as well"),
        (lambda qc: qc["tensor_aliases"].update({"proj_out_2.bias": "no.such.tensor"}), "source not in the file"),
        (lambda qc: qc["tensor_aliases"].update({"no.such.alias": "pos_embed.proj.weight"}), r"unexpected keys: \[no"),
        (lambda qc: qc["tensor_aliases"].update({"transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight":
                                                  "pos_embed.proj.bias"}), "shape/dtype mismatch"),
        (lambda qc: qc.update(tensor_aliases=["a", "b"]), "tensor_aliases must map"),
    ],
    ids=["stored-twice", "dangling", "unknown-alias", "wrong-shape", "not-a-map"],
)
def test_bad_aliases_are_refused(tmp_path, edit, message):
    folder = save_quantized(with_shared_embedders(), tmp_path / "shared")
    edit_config(folder, lambda config: edit(config["quantization_config"]))
    with pytest.raises(QuantizedCheckpointError, match=message):
        load_quantized(folder)


def test_tie_tensors_refuses_mismatches():
    model = quantized_dit(CONFIG)
    with pytest.raises(ValueError, match="cannot tie"):
        tie_tensors_(model, {"proj_out_2.bias": "proj_out_1.bias"})  # other shape
    saved = tie_tensors_(model, {"transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight":
                                 "transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"})
    assert saved == model.transformer_blocks[0].norm1.emb.timestep_embedder.linear_1.weight.numel() * 4
