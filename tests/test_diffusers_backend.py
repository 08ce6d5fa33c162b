"""vq4dit as a diffusers quantization backend: from_pretrained / save_pretrained / push_to_hub of
packed models and pipelines through the quantizer hooks only (nothing of diffusers replaced), hub ids
from a local hub cache (offline), the model card, format 1-3 folders."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

pytest.importorskip("accelerate", reason="diffusers loads quantized models only with accelerate (pip install -e .)")

import vq4dit  # noqa: E402  (registers the backend)
from tests.test_export import forward, quantized_dit  # noqa: E402
from tests.test_shared_tensors import with_shared_embedders  # noqa: E402
from vq4dit.convert import apply_timestep_freq_shift  # noqa: E402
from vq4dit.io import diffusers_backend, load_quantized, save_quantized  # noqa: E402
from vq4dit.layers import VQLinear  # noqa: E402
from vq4dit.vq_config import VQConfig  # noqa: E402

CONFIG = VQConfig(codebook_size=16, subvector_dim=4, num_candidates=1, kmeans_iters=0)
EMB = "transformer_blocks.{}.norm1.emb.class_embedder.embedding_table.weight"
WEIGHTS = "diffusion_pytorch_model.safetensors"
V3 = Path(__file__).parent / "data" / "packed_v3"  # written by save_quantized at 715203d (model.safetensors)


@pytest.fixture(scope="module")
def shared():
    """A hard-quantized tiny DiT with identical per-block embedders (stored once, tied on load)."""
    return with_shared_embedders().eval()


@pytest.fixture(scope="module")
def packed(shared, tmp_path_factory):
    return save_quantized(shared, tmp_path_factory.mktemp("packed") / "dit-vq")


def tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(32,), latent_channels=4, norm_num_groups=32, sample_size=16,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
    )


def sample(pipe) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 2], num_inference_steps=2, generator=generator, output_type="np").images


def file_tensors(folder: Path) -> tuple[dict, dict]:
    file = next(folder / name for name in (WEIGHTS, "model.safetensors") if (folder / name).is_file())
    with safetensors.safe_open(str(file), framework="pt") as handle:
        metadata = handle.metadata()
    return safetensors.torch.load_file(str(file)), metadata


def forward_in(model, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(dtype)
    with torch.no_grad():
        return model(x, timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 999])).sample


def assert_same_model(a, b, dtype=torch.float32):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key
    assert torch.equal(forward_in(a, dtype), forward_in(b, dtype))


# ------------------------------------------------------------------------------ the four lines


def test_the_four_lines_of_a_diffusers_user(packed, shared, tmp_path):
    """Load, sample, save, reload: identical images; the pipeline's transformer/ is packed."""
    folder = tmp_path / "dit-pipe"
    DiTPipeline(transformer=load_quantized(packed), vae=tiny_vae(), scheduler=DDIMScheduler(),
                id2label=None).save_pretrained(folder)
    shutil.rmtree(folder / "transformer")
    shutil.copytree(packed, folder / "transformer")  # as save_quantized wrote it

    # the four lines (README "diffusers"), the first being `import vq4dit`
    pipe = DiTPipeline.from_pretrained(folder)
    images = sample(pipe)
    pipe.save_pretrained(tmp_path / "resaved")

    reloaded = DiTPipeline.from_pretrained(tmp_path / "resaved")
    assert np.array_equal(sample(reloaded), images)
    assert isinstance(reloaded.transformer.transformer_blocks[0].attn1.to_q, VQLinear)
    plain = DiTPipeline(transformer=load_quantized(packed), vae=pipe.vae, scheduler=DDIMScheduler(), id2label=None)
    assert np.array_equal(sample(plain), images)  # == load_quantized
    written = tmp_path / "resaved" / "transformer"
    assert sorted(p.name for p in written.iterdir()) == ["config.json", WEIGHTS]  # stock: no model card
    assert os.path.getsize(written / WEIGHTS) == os.path.getsize(packed / WEIGHTS)
    vq4dit.save_pretrained(pipe, tmp_path / "atomic")  # the atomic writer: same files plus the card
    assert sorted(p.name for p in (tmp_path / "atomic" / "transformer").iterdir()) == ["README.md", "config.json", WEIGHTS]
    assert np.array_equal(sample(DiTPipeline.from_pretrained(tmp_path / "atomic")), images)


# ------------------------------------------------------------------------- model round trips


def test_from_pretrained_is_load_quantized(packed, shared, tmp_path):
    model = DiTTransformer2DModel.from_pretrained(packed)
    reference = load_quantized(packed)
    assert_same_model(model, reference)
    assert torch.equal(forward(model), forward(shared))
    assert model.hf_quantizer.quantization_config.quant_method == "vq4dit"
    emb = [model.get_parameter(EMB.format(b)) for b in range(2)]
    assert emb[0] is emb[1]  # shared embedders are one tensor again, as load_quantized ties them


def test_save_pretrained_and_save_quantized_read_each_other(packed, shared, tmp_path):
    DiTTransformer2DModel.from_pretrained(packed).save_pretrained(tmp_path / "from_pretrained")
    load_quantized(packed).save_pretrained(tmp_path / "from_load")
    ours, ours_meta = file_tensors(packed)
    for folder in (tmp_path / "from_pretrained", tmp_path / "from_load"):
        theirs, meta = file_tensors(folder)
        assert theirs.keys() == ours.keys() and meta["vq4dit_sha256"] == ours_meta["vq4dit_sha256"]
        qc = json.loads((folder / "config.json").read_text())["quantization_config"]
        assert qc == json.loads((packed / "config.json").read_text())["quantization_config"]
        assert_same_model(load_quantized(folder), DiTTransformer2DModel.from_pretrained(folder))
        assert torch.equal(forward(load_quantized(folder)), forward(shared))


def test_save_pretrained_of_a_freshly_quantized_model(tmp_path):
    model = quantized_dit(CONFIG)  # quantize_ gives every diffusers model vq4dit's save_pretrained
    model.save_pretrained(tmp_path / "fresh")
    assert torch.equal(forward(DiTTransformer2DModel.from_pretrained(tmp_path / "fresh")), forward(model))
    soft = quantized_dit(VQConfig(codebook_size=16, subvector_dim=4, num_candidates=2, kmeans_iters=0), finalize=False)
    with pytest.raises(vq4dit.QuantizedCheckpointError, match="finalize_"):
        soft.save_pretrained(tmp_path / "soft")


def test_torch_dtype_and_device(packed):
    model = DiTTransformer2DModel.from_pretrained(packed, torch_dtype=torch.bfloat16)
    reference = load_quantized(packed).to(torch.bfloat16)
    assert model.transformer_blocks[0].attn1.to_q.codebook.dtype == torch.bfloat16
    # diffusers' from_pretrained leaves non-persistent buffers as built (the sin-cos table in
    # float32), as for any DiT; .to() casts them: the only difference
    assert model.pos_embed.pos_embed.dtype == torch.float32
    reference.pos_embed.pos_embed = model.pos_embed.pos_embed
    assert_same_model(model, reference, torch.bfloat16)
    assert_same_model(DiTTransformer2DModel.from_pretrained(packed, device_map="cpu"), load_quantized(packed))
    with pytest.raises(ValueError, match="one device"):
        DiTTransformer2DModel.from_pretrained(packed, device_map="auto")


def test_timestep_freq_shift_and_extra_keys_survive(tmp_path):
    model = apply_timestep_freq_shift(quantized_dit(CONFIG), 0)
    model.register_to_config(calibration_note="w2 run 3")
    save_quantized(model, tmp_path / "shifted")
    loaded = DiTTransformer2DModel.from_pretrained(tmp_path / "shifted")
    assert loaded.transformer_blocks[1].norm1.emb.time_proj.downscale_freq_shift == 0
    assert loaded.config.calibration_note == "w2 run 3"
    assert torch.equal(forward(loaded), forward(model))
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(forward(load_quantized(tmp_path / "again")), forward(model))


def test_corrupted_file_is_refused(packed, tmp_path):
    folder = shutil.copytree(packed, tmp_path / "bad")
    tensors, meta = file_tensors(folder)
    tensors["proj_out_2.bias"] = tensors["proj_out_2.bias"] + 1
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS), metadata=meta)
    with pytest.raises(vq4dit.QuantizedCheckpointError, match="checksum"):
        DiTTransformer2DModel.from_pretrained(folder)


# ------------------------------------------------------------------------------ the hub, offline


def hub_cache(tmp_path: Path, repo_id: str, folder: Path, commit: str = "a" * 40) -> Path:
    """A huggingface_hub cache holding ``folder`` as ``repo_id`` at ``commit`` (= refs/main)."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


@pytest.fixture()
def offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_ids_load_from_the_hub_cache(packed, shared, tmp_path, offline):
    cache = hub_cache(tmp_path, "org/dit-vq", packed)
    by_id = load_quantized("org/dit-vq", cache_dir=cache)
    assert torch.equal(forward(by_id), forward(shared))
    assert torch.equal(forward(load_quantized("org/dit-vq", revision="a" * 40, cache_dir=cache)), forward(shared))
    assert_same_model(DiTTransformer2DModel.from_pretrained("org/dit-vq", cache_dir=cache), by_id)
    with pytest.raises(vq4dit.QuantizedCheckpointError, match="org/missing is neither a local folder"):
        load_quantized("org/missing", cache_dir=cache)


def test_push_to_hub_uploads_the_folder(shared, tmp_path, monkeypatch):
    import diffusers.utils.hub_utils
    from huggingface_hub import HfApi

    calls = []

    class Repo:
        def __init__(self, repo_id):
            self.repo_id = repo_id

    def upload_folder(*args, folder_path, repo_id, **kwargs):
        calls.append((repo_id, sorted(os.listdir(folder_path)), kwargs.get("commit_message")))
        return "https://hub/commit/1"

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kwargs: Repo(repo_id))
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setattr(diffusers.utils.hub_utils, "create_repo", lambda repo_id, **kwargs: Repo(repo_id))
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", upload_folder)
    monkeypatch.setattr(diffusers.utils.hub_utils, "load_or_create_model_card", lambda *a, **k: type(
        "Card", (), {"save": lambda self, path: Path(path).write_text("stock card")})())
    monkeypatch.setattr(diffusers.utils.hub_utils, "populate_model_card", lambda card, *a, **k: card)
    save_quantized(shared, tmp_path / "a", push_to_hub="org/dit-vq", commit_message="w2")
    vq4dit.save_pretrained(load_quantized(tmp_path / "a"), tmp_path / "b", push_to_hub="org/dit-vq-2")
    DiTTransformer2DModel.from_pretrained(tmp_path / "a").push_to_hub("org/dit-vq-3", commit_message="v3")  # stock
    files = ["README.md", "config.json", WEIGHTS]
    assert calls == [("org/dit-vq", files, "w2"), ("org/dit-vq-2", files, "Upload vq4dit-quantized model"),
                     ("org/dit-vq-3", files, "v3")]


# ---------------------------------------------------------------------------------- model card


def test_model_card(shared, tmp_path):
    card = {"base_model": "facebook/DiT-XL-2-256", "num_candidates": 2, "calibration_seconds": 85.4,
            "steps": 325, "trajectories": 8, "cfg_scale": 4.0}
    save_quantized(shared, tmp_path / "carded", card=card)
    text = (tmp_path / "carded" / "README.md").read_text()
    for fact in ("base_model: facebook/DiT-XL-2-256", "| 16 / 4 / 2 |", "| 85 s |", "- steps: 325",
                 "- cfg_scale: 4.0", f"| vq4dit version | {vq4dit.__version__} |", "bits per weight, all-in",
                 "MiB |"):
        assert fact in text, fact
    vq4dit.save_pretrained(load_quantized(tmp_path / "carded"), tmp_path / "resaved")  # the card is kept
    assert (tmp_path / "resaved" / "README.md").read_text() == text
    load_quantized(tmp_path / "carded").save_pretrained(tmp_path / "stock")  # stock: the facts stay in config.json
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["quantization_config"]["card"] == card
    save_quantized(shared, tmp_path / "bare")  # without a card: what the model tells
    bare = (tmp_path / "bare" / "README.md").read_text()
    assert "| 16 / 4 / not recorded |" in bare and "| calibration time | not recorded |" in bare


# ------------------------------------------------------------------------- diffusers versions


def test_unsupported_diffusers_version_is_said_clearly(monkeypatch, tmp_path):
    monkeypatch.setattr(diffusers_backend, "diffusers_version", lambda: "0.30.0")
    with pytest.warns(UserWarning, match=r"supports diffusers >=0\.39,<0\.43; found 0\.30\.0"):
        assert diffusers_backend.register_on_import() is False
    with pytest.raises(diffusers_backend.UnsupportedDiffusersError, match="use vq4dit.load_quantized"):
        quantized_dit(CONFIG).save_pretrained(tmp_path / "x")


def test_import_vq4dit_with_an_unsupported_diffusers_warns():
    code = ("import warnings, diffusers; diffusers.__version__ = '0.99.0'; warnings.simplefilter('always'); "
            "import vq4dit; print(callable(vq4dit.load_quantized))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    assert "supports diffusers >=0.39,<0.43; found 0.99.0" in done.stderr


def test_calibration_runs_write_their_settings_and_time_into_the_card(shared, tmp_path):
    from types import SimpleNamespace

    from callbacks.final_assignment import calibration_card
    from vq4dit.lightning import CalibrationModule
    from vq4dit.lightning.settings import resolved_record

    hparams = resolved_record(CalibrationModule.__init__, {"model": "reference", "recipe": "paper", "export": {"dir": "x"}})
    trainer = SimpleNamespace(global_step=325, datamodule=SimpleNamespace(hparams={"num_trajectories": 8, "seed": 3}))
    card = calibration_card(trainer, SimpleNamespace(hparams=hparams), started=0.0)
    assert card["calibration_seconds"] > 0 and not any(key.startswith("export.") for key in card)
    assert {k: card[k] for k in ("base_model", "num_candidates", "calibration_steps", "vq.bits", "calibration.optimizer",
                                 "data.num_trajectories", "data.seed", "vq.ratio_init", "vq.row_scale")} == {
        "base_model": "reference", "num_candidates": 2, "calibration_steps": 325, "vq.bits": 2,
        "calibration.optimizer": "rmsprop", "data.num_trajectories": 8, "data.seed": 3,
        "vq.ratio_init": "inverse_distance", "vq.row_scale": False}
    text = (save_quantized(shared, tmp_path / "run", card=card) / "README.md").read_text()
    assert "| 16 / 4 / 2 |" in text and "- calibration_steps: 325" in text and "base_model: reference" in text


# ------------------------------------------------------------------ nothing of diffusers replaced


def test_import_vq4dit_replaces_nothing_in_diffusers(packed, tmp_path):
    code = ("import diffusers.models.modeling_utils as m, diffusers.utils.hub_utils as h; "
            "before = (m._get_model_file, m.ModelMixin.save_pretrained, h.PushToHubMixin.push_to_hub); import vq4dit; "
            "print(before == (m._get_model_file, m.ModelMixin.save_pretrained, h.PushToHubMixin.push_to_hub))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[1], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.stdout.strip() == "True", done.stderr
    models = [load_quantized(packed), DiTTransformer2DModel.from_pretrained(packed), quantized_dit(CONFIG),
              DiTPipeline.from_pretrained(pipeline_folder(packed, tmp_path)).transformer]
    for model in models:
        assert not {"save_pretrained", "push_to_hub"} & set(vars(model))
        assert isinstance(model.hf_quantizer, diffusers_backend.VQ4DiTQuantizer)  # diffusers' own attribute


def pipeline_folder(packed: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "pipe-src"
    DiTPipeline(transformer=load_quantized(packed), vae=tiny_vae(), scheduler=DDIMScheduler(),
                id2label=None).save_pretrained(folder)
    return folder


def test_a_copy_saves_itself_not_the_original(packed, tmp_path):
    import copy
    import pickle

    model = load_quantized(packed)
    for how, twin in (("deepcopy", copy.deepcopy(model)), ("pickle", pickle.loads(pickle.dumps(model)))):
        with torch.no_grad():
            twin.proj_out_2.bias.add_(1)
        twin.save_pretrained(tmp_path / how)
        assert torch.equal(load_quantized(tmp_path / how).proj_out_2.bias, twin.proj_out_2.bias), how
        assert not torch.equal(twin.proj_out_2.bias, model.proj_out_2.bias)


# ------------------------------------------------------------------------ format 1-3 folders


def test_a_v3_folder_written_by_715203d_loads_and_resaves_in_the_diffusers_layout(tmp_path):
    assert (V3 / "model.safetensors").is_file() and not (V3 / WEIGHTS).exists()
    qc = json.loads((V3 / "config.json").read_text())["quantization_config"]
    assert qc["format_version"] == 3 and qc["tensor_aliases"] and qc["card"]["base_model"] == "tiny-test"
    expected = safetensors.torch.load_file(str(V3.parent / "packed_v3_expected.safetensors"))
    model = load_quantized(V3)
    with torch.no_grad():
        out = model(expected["x"], timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 9])).sample
    torch.testing.assert_close(out, expected["y"], rtol=1e-5, atol=1e-5)  # same shift 0, scales, aliases
    assert model.transformer_blocks[0].norm1.emb.time_proj.downscale_freq_shift == 0
    resaved = save_quantized(model, tmp_path / "v3-resaved")
    old, _ = file_tensors(V3)
    new, _ = file_tensors(resaved)
    assert old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)  # the same bytes
    assert json.loads((resaved / "config.json").read_text())["quantization_config"]["card"] == qc["card"]
    stock = DiTTransformer2DModel.from_pretrained(resaved)
    assert all(torch.equal(a, b) for a, b in zip(stock.state_dict().values(), model.state_dict().values()))
    with torch.no_grad():
        again = stock(expected["x"], timestep=torch.tensor([3, 700]), class_labels=torch.tensor([1, 9])).sample
    assert torch.equal(again, out)
