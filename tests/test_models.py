"""Tests of vq4dit.models / vq4dit.convert: presets, loading, conversion parity, errors, filter."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from tests.dit_reference import dit_forward, random_original_state_dict
from vq4dit.models import (
    PRESETS,
    TIMESTEP_FREQ_SHIFT_KEY,
    DiTLoadError,
    NonFiniteError,
    apply_timestep_freq_shift,
    block_modules,
    check_finite,
    load_dit,
    preset_config,
)

HEADS = 4  # the synthetic checkpoint's hidden size 64 is not a paper size: heads passed explicitly


@pytest.fixture(scope="module")
def original_sd() -> dict[str, torch.Tensor]:
    return random_original_state_dict(hidden=64, depth=2, patch=2, latent=8)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 4, 8, 8, generator=gen)  # [N, C, H, W] latents
    t = torch.tensor([0, 1, 250, 731, 999])
    y = torch.tensor([0, 7, 999, 1000, 1000])  # 1000 = null class (CFG)
    return x, t, y


def _run(model: DiTTransformer2DModel, inputs) -> torch.Tensor:
    x, t, y = inputs
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def _save(obj, path) -> str:
    torch.save(obj, path)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Original checkpoint conversion: parity with the independent reference
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "ema", "training"])
def test_converted_checkpoint_matches_reference(tmp_path, original_sd, inputs, layout):
    if layout == "plain":
        obj = original_sd
    elif layout == "ema":
        obj = {"ema": original_sd}
    else:  # original training checkpoint: ema preferred over a different "model", args Namespace
        other = {k: v + 1.0 for k, v in original_sd.items()}
        obj = {"model": other, "ema": original_sd, "opt": {}, "args": argparse.Namespace(lr=1e-4)}
    model = load_dit(_save(obj, tmp_path / "dit.pt"), num_heads=HEADS)
    assert not model.training
    assert model.config.num_layers == 2 and model.config.num_attention_heads == HEADS
    assert model.config.num_embeds_ada_norm == 1000 and model.config.out_channels == 8
    ref = dit_forward(original_sd, *inputs, num_heads=HEADS)
    assert torch.allclose(_run(model, inputs), ref, atol=1e-5)


def test_timestep_freq_shift_is_needed_for_parity(tmp_path, original_sd, inputs):
    """Sensitivity check: diffusers' default frequencies (shift 1) visibly break parity."""
    model = load_dit(_save(original_sd, tmp_path / "dit.pth"), num_heads=HEADS)
    ref = dit_forward(original_sd, *inputs, num_heads=HEADS)
    apply_timestep_freq_shift(model, 1)
    assert (_run(model, inputs) - ref).abs().max() > 1e-3


def test_converted_parity_survives_save_pretrained(tmp_path, original_sd, inputs):
    with pytest.warns(UserWarning, match="stock diffusers ignores"):  # said at conversion, not at save
        model = load_dit(_save(original_sd, tmp_path / "dit.pt"), num_heads=HEADS)
    model.save_pretrained(tmp_path / "converted")
    config = json.loads((tmp_path / "converted" / "config.json").read_text())
    assert config[TIMESTEP_FREQ_SHIFT_KEY] == 0
    reloaded = load_dit(tmp_path / "converted")
    assert all(b.norm1.emb.time_proj.downscale_freq_shift == 0 for b in block_modules(reloaded))
    ref = dit_forward(original_sd, *inputs, num_heads=HEADS)
    assert torch.allclose(_run(reloaded, inputs), ref, atol=1e-5)


def test_paper_hidden_size_needs_no_num_heads(tmp_path):
    sd = random_original_state_dict(hidden=384, depth=1, patch=8, latent=16, num_classes=10)
    model = load_dit(_save(sd, tmp_path / "s8.pt"))
    assert model.config.num_attention_heads == 6 and model.config.attention_head_dim == 64
    assert model.config.patch_size == 8 and model.config.sample_size == 16


# ---------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------


def test_all_presets_parse():
    paper = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for size, (depth, hidden, heads) in paper.items():
        for patch in (2, 4, 8):
            for image, name in ((256, f"DiT-{size}/{patch}"), (256, f"DiT-{size}/{patch}-256"),
                                (512, f"DiT-{size}/{patch}-512")):  # fmt: skip
                cfg = preset_config(name)
                assert cfg["num_layers"] == depth and cfg["num_attention_heads"] == heads
                assert cfg["num_attention_heads"] * cfg["attention_head_dim"] == hidden
                assert cfg["patch_size"] == patch and cfg["sample_size"] == image // 8
    assert len(PRESETS) == 4 * 3 * 3 + 1
    cfg = preset_config("tiny")
    cfg["num_layers"] = 99  # a copy: PRESETS unchanged
    assert PRESETS["tiny"]["num_layers"] == 2


def test_xl2_256_config_and_param_count():
    cfg = preset_config("DiT-XL/2-256")
    assert cfg == preset_config("DiT-XL/2")
    expected = {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4,
                "out_channels": 8, "num_layers": 28, "sample_size": 32, "patch_size": 2,
                "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
                "activation_fn": "gelu-approximate"}  # fmt: skip
    assert expected.items() <= cfg.items()
    with torch.device("meta"):
        model = DiTTransformer2DModel(**cfg)
    assert sum(p.numel() for p in model.parameters()) == 749_826_464
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table
    assert table.num_embeddings == 1001


def test_tiny_preset_builds_in_eval_mode():
    model = load_dit("tiny", dtype=torch.bfloat16)
    assert isinstance(model, DiTTransformer2DModel) and not model.training
    assert all(not m.training for m in model.modules())
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    cfg = model.config
    assert (cfg.sample_size, cfg.num_layers, cfg.patch_size, cfg.in_channels, cfg.out_channels) == (
        8, 2, 2, 4, 8)  # fmt: skip
    assert cfg.num_attention_heads * cfg.attention_head_dim == 64
    assert cfg.num_embeds_ada_norm == 1000
    out = model(torch.randn(2, 4, 8, 8, dtype=torch.bfloat16), timestep=torch.tensor([3, 999]),
                class_labels=torch.tensor([1, 1000])).sample  # fmt: skip
    assert out.shape == (2, 8, 8, 8)


# ---------------------------------------------------------------------------------------------
# Diffusers folders and hub ids
# ---------------------------------------------------------------------------------------------


def test_bare_and_pipeline_folders_round_trip(tmp_path, inputs):
    model = load_dit("tiny")
    model.save_pretrained(tmp_path / "bare")
    model.save_pretrained(tmp_path / "pipe" / "transformer")
    model_index = {"_class_name": "DiTPipeline", "_diffusers_version": "0.42.1",
                   "transformer": ["diffusers", "DiTTransformer2DModel"]}  # fmt: skip
    (tmp_path / "pipe" / "model_index.json").write_text(json.dumps(model_index))
    expected = _run(model, inputs)
    for folder in (tmp_path / "bare", str(tmp_path / "pipe")):
        loaded = load_dit(folder)
        assert not loaded.training
        assert torch.equal(_run(loaded, inputs), expected)


def test_legacy_transformer2d_snapshot_loads(tmp_path, inputs):
    """Hub DiT snapshots (diffusers 0.12) name the class Transformer2DModel, norm ada_norm_zero."""
    model = load_dit("tiny")
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update({"_class_name": "Transformer2DModel", "_diffusers_version": "0.12.0.dev0",
                   "cross_attention_dim": None, "num_vector_embeds": None,
                   "only_cross_attention": False})  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert torch.equal(_run(load_dit(tmp_path), inputs), _run(model, inputs))


def test_hub_id_tries_pipeline_then_transformer(monkeypatch):
    import huggingface_hub

    calls, configs = [], []

    def fake_config(repo_id, filename, subfolder=None, **kwargs):
        configs.append(subfolder)
        if subfolder == "transformer":
            raise huggingface_hub.errors.EntryNotFoundError("no transformer/ subfolder")
        path = Path(tempfile.mkdtemp()) / "config.json"
        path.write_text(json.dumps({"_class_name": "DiTTransformer2DModel", "norm_type": "ada_norm_zero"}))
        return str(path)

    def fake_from_pretrained(repo_id, subfolder=None, **kwargs):
        calls.append((repo_id, subfolder))
        return DiTTransformer2DModel(**PRESETS["tiny"]).train()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_config)
    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", fake_from_pretrained)
    model = load_dit("some-org/some-dit")
    assert configs == ["transformer", None] and calls == [("some-org/some-dit", None)]
    assert not model.training


def _hub_cache(cache: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face hub cache holding ``folder``'s files as the snapshot of ``repo_id`` (main)."""
    import shutil

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_a_pixart_hub_id_loads_from_the_hub_cache_offline(tmp_path):
    """The real hub path, offline: a PixArt pipeline and a bare DiT in a Hugging Face cache
    (HF_HUB_OFFLINE=1, a fresh process: huggingface_hub reads both at import)."""
    import subprocess
    import sys

    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    PixArtTransformer2DModel(num_layers=1, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
                             sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=12,
                             ).save_pretrained(tmp_path / "pipe" / "transformer")
    DiTTransformer2DModel(**PRESETS["tiny"]).save_pretrained(tmp_path / "dit")
    _hub_cache(tmp_path / "hub", "org/tiny-pixart", tmp_path / "pipe")
    _hub_cache(tmp_path / "hub", "org/tiny-dit", tmp_path / "dit")
    script = ("from vq4dit.models import load_dit\n"
              "for source in ('org/tiny-pixart', 'org/tiny-dit'):\n"
              "    print(type(load_dit(source)).__name__)\n"
              "try:\n    load_dit('org/absent')\nexcept ValueError as error:\n    print('error:', error)\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    lines = result.stdout.splitlines()
    assert lines[:2] == ["PixArtTransformer2DModel", "DiTTransformer2DModel"], result.stderr[-2000:]
    assert lines[2].startswith("error:") and "org/absent" in lines[2] and "hub id" in lines[2]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("not a model", "valid presets"),
        ("foo", "valid presets"),
        ("DiT-XL/3", "unknown DiT preset .*DiT-XL/2"),
        ("dit-xl/2", "unknown DiT preset"),
        ("a/b/c", "does not exist"),
        ("./missing", "does not exist"),
        ("missing.pt", "does not exist"),
        ("bad org/name!", "valid hub id"),
    ],
)
def test_invalid_strings_fail_without_network(monkeypatch, source, message):
    def no_network(*args, **kwargs):
        raise AssertionError("load_dit must not reach the hub for this source")

    monkeypatch.setattr(DiTTransformer2DModel, "from_pretrained", no_network)
    with pytest.raises(DiTLoadError, match=message):
        load_dit(source)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def test_missing_path(tmp_path):
    with pytest.raises(DiTLoadError, match="does not exist"):
        load_dit(tmp_path / "nowhere")


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiTLoadError, match="no config.json"):
        load_dit(tmp_path / "empty")

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(DiTLoadError, match="'UNet2DModel'.*expected a DiTTransformer2DModel"):
        load_dit(tmp_path / "unet")

    (tmp_path / "noweights").mkdir()
    load_dit("tiny").save_config(tmp_path / "noweights")
    with pytest.raises(DiTLoadError, match="no weights"):
        load_dit(tmp_path / "noweights")

    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "config.json").write_text("{not json")
    with pytest.raises(DiTLoadError, match="JSON"):
        load_dit(tmp_path / "badjson")


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(DiTLoadError, match=r"unknown DiT preset 'DiT-M/2'.*DiT-XL/2-256.*tiny"):
        preset_config("DiT-M/2")


def test_checkpoint_key_and_shape_errors(tmp_path, original_sd):
    extra = {**original_sd, "blocks.0.attn.extra.weight": torch.zeros(1)}
    with pytest.raises(DiTLoadError, match=r"unknown keys \[blocks\.0\.attn\.extra\.weight\]"):
        load_dit(_save(extra, tmp_path / "extra.pt"), num_heads=HEADS)

    missing = {k: v for k, v in original_sd.items() if k != "blocks.1.mlp.fc2.bias"}
    with pytest.raises(DiTLoadError, match=r"missing keys \[blocks\.1\.mlp\.fc2\.bias\]"):
        load_dit(_save(missing, tmp_path / "missing.pt"), num_heads=HEADS)

    wrong = {**original_sd, "blocks.0.mlp.fc1.weight": torch.zeros(128, 64)}
    with pytest.raises(DiTLoadError, match=r"wrong shapes \[blocks\.0\.mlp\.fc1\.weight: "
                                           r"\(128, 64\) != expected \(256, 64\)\]"):  # fmt: skip
        load_dit(_save(wrong, tmp_path / "wrong.pt"), num_heads=HEADS)

    not_dit = {"encoder.weight": torch.zeros(2, 2)}
    with pytest.raises(DiTLoadError, match="not an original DiT state dict: missing keys"):
        load_dit(_save(not_dit, tmp_path / "other.pt"))


def test_checkpoint_without_num_heads_for_unknown_hidden(tmp_path, original_sd):
    with pytest.raises(DiTLoadError, match="hidden size 64.*num_heads="):
        load_dit(_save(original_sd, tmp_path / "dit.pt"))
    with pytest.raises(DiTLoadError, match="num_heads=5 does not divide"):
        load_dit(tmp_path / "dit.pt", num_heads=5)
    with pytest.raises(DiTLoadError, match="only applies to original"):
        load_dit("tiny", num_heads=2)


def test_checkpoint_pos_embed_mismatch(tmp_path, original_sd):
    bad = {**original_sd, "pos_embed": original_sd["pos_embed"].flip(1)}
    with pytest.raises(DiTLoadError, match="pos_embed differs"):
        load_dit(_save(bad, tmp_path / "pos.pt"), num_heads=HEADS)


def test_unreadable_checkpoint_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("these are not weights\n")
    with pytest.raises(DiTLoadError, match="cannot read .*notes.pt.* as a torch checkpoint"):
        load_dit(text)

    with pytest.raises(DiTLoadError, match="not a state dict"):
        load_dit(_save([torch.zeros(1)], tmp_path / "list.pt"))

    other = tmp_path / "weights.safetensors"
    other.write_bytes(b"\0")
    with pytest.raises(DiTLoadError, match="unsupported type"):
        load_dit(other)


# ---------------------------------------------------------------------------------------------
# Portability of converted checkpoints; NaN/Inf
# ---------------------------------------------------------------------------------------------


def test_converting_says_once_that_stock_diffusers_ignores_the_shift(tmp_path, original_sd, inputs):
    """Stock diffusers cannot express the original frequencies (shift 0) and ignores the config
    key: it would load an unquantized save ~25 % off. No diffusers hook exists for unquantized
    models, so the conversion says it (once per process), and nothing is patched."""
    warning = r"stock diffusers ignores.*Load such folders with vq4dit\.load_dit\(folder\)"
    with pytest.warns(UserWarning, match=warning):
        converted = load_dit(_save(original_sd, tmp_path / "dit.pt"), num_heads=HEADS)
    assert "save_pretrained" not in vars(converted)
    ref = dit_forward(original_sd, *inputs, num_heads=HEADS)
    copy.deepcopy(converted).save_pretrained(tmp_path / "bare")
    stock = DiTTransformer2DModel.from_pretrained(tmp_path / "bare")  # the trap the warning names
    difference = (_run(stock, inputs) - ref).norm() / ref.norm()
    assert difference > 0.05
    reloaded = load_dit(tmp_path / "bare")
    assert torch.allclose(_run(reloaded, inputs), ref, atol=1e-5)
    vae = AutoencoderKL(
        block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )
    DiTPipeline(transformer=reloaded, vae=vae, scheduler=DDIMScheduler(), id2label=None).save_pretrained(tmp_path / "pipe")
    assert torch.allclose(_run(load_dit(tmp_path / "pipe"), inputs), ref, atol=1e-5)
    with warnings.catch_warnings():  # diffusers' own frequencies: nothing to warn about
        warnings.simplefilter("error")
        apply_timestep_freq_shift(reloaded, 1).save_pretrained(tmp_path / "shift1")
        load_dit("tiny").save_pretrained(tmp_path / "tiny")
        load_dit(tmp_path / "bare")


def test_check_finite_names_tensors_and_count():
    tensors = {f"t{i}": torch.tensor([1.0, math.nan if i % 2 else math.inf]) for i in range(7)}
    tensors.update(ok=torch.ones(2), codes=torch.zeros(2, dtype=torch.uint8), meta=torch.empty(2, device="meta"))
    with pytest.raises(NonFiniteError, match=r"^teacher has NaN/Inf values in 7 tensor\(s\): t0, t1, t2, t3, t4, \.\.\.$"):
        check_finite(tensors, what="teacher")
    model = load_dit("tiny")
    check_finite(model)
    with torch.no_grad():
        model.transformer_blocks[1].ff.net[2].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"model has NaN/Inf values in 1 tensor\(s\): transformer_blocks\.1\.ff\.net\.2\.weight$"):
        check_finite(model)


def test_load_dit_refuses_nonfinite_weights(tmp_path, original_sd):
    model = load_dit("tiny")
    with torch.no_grad():
        model.proj_out_2.bias[3] = math.inf
        model.pos_embed.proj.weight[0, 0, 0, 0] = 1e5  # float16: Inf
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(DiTLoadError, match=r"1 tensor\(s\): proj_out_2\.bias; pass allow_nonfinite=True"):
        load_dit(tmp_path / "bad")
    assert torch.isinf(load_dit(tmp_path / "bad", allow_nonfinite=True).proj_out_2.bias).any()
    with pytest.raises(DiTLoadError, match=r"2 tensor\(s\): pos_embed\.proj\.weight, proj_out_2\.bias"):
        load_dit(tmp_path / "bad", dtype=torch.float16)
    nan_sd = {**original_sd, "blocks.1.mlp.fc1.weight": torch.full((256, 64), math.nan)}
    with pytest.raises(DiTLoadError, match=r"dit\.pt' has NaN/Inf .*transformer_blocks\.1\.ff\.net\.0\.proj\.weight"):
        load_dit(_save(nan_sd, tmp_path / "dit.pt"), num_heads=HEADS)
