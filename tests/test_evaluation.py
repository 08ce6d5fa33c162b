"""Evaluation: deterministic sampling, VAE decoding, real-image sets, `train.py test` / `predict`."""


import numpy as np
import pytest
import torch

from train import cli_main
from vq4dit.evaluation import decode, evaluation_plan, generate_images, load_real_images, load_vae
from vq4dit.export import load_quantized, save_quantized
from vq4dit.models import default_linear_filter
from vq4dit.quantize import quantize_, vq_layers
from vq4dit.vq_config import VQConfig
from vq4dit.reference import load_reference_model
from vq4dit.sampling import SamplerConfig

FAST = SamplerConfig(sampler="ddpm", num_steps=4, guidance_scale=1.5, clip_denoised=True)


def test_evaluation_plan_is_balanced_and_deterministic():
    labels, seeds = evaluation_plan(25, 10, seed=3)
    assert labels.tolist()[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    assert torch.bincount(labels).tolist() == [3] * 5 + [2] * 5
    assert len(set(seeds)) == 25 and seeds == evaluation_plan(25, 10, seed=3)[1]
    assert set(seeds).isdisjoint(evaluation_plan(25, 10, seed=4)[1])
    with pytest.raises(ValueError):
        evaluation_plan(0, 10)


@pytest.fixture(scope="module")
def reference():
    return load_reference_model()


def test_generated_images_depend_only_on_seed_and_label(reference):
    labels, seeds = evaluation_plan(6, 10)
    whole = generate_images(reference, labels, seeds, FAST, batch_size=6)
    assert whole.shape == (6, 3, 16, 16) and 0.0 <= whole.min() and whole.max() <= 1.0
    in_pieces = generate_images(reference, labels, seeds, FAST, batch_size=4)  # other batch split
    torch.testing.assert_close(whole, in_pieces, atol=1e-5, rtol=0)
    assert not torch.allclose(whole[:1], generate_images(reference, labels[:1], [999], FAST))


def test_decode_needs_a_vae_for_latents_and_uses_it(tmp_path):
    with pytest.raises(ValueError, match="needs a VAE"):
        decode(torch.zeros(2, 4, 8, 8))
    from diffusers import AutoencoderKL

    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
        sample_size=8,
    ).save_pretrained(tmp_path / "vae")
    vae = load_vae(str(tmp_path / "vae"))
    images = decode(torch.randn(2, 4, 8, 8), vae)
    assert images.shape == (2, 3, 8, 8) and 0.0 <= images.min() and images.max() <= 1.0
    expected = (vae.decode(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) / 0.18215).sample)
    got = decode(torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)), vae)
    torch.testing.assert_close(got, ((expected + 1) / 2).clamp(0, 1))
    with pytest.raises(ValueError, match="cannot load the VAE"):
        load_vae(str(tmp_path / "missing"))


def test_real_image_sets(tmp_path):
    digits = load_real_images("digits")
    assert digits.shape == (1797, 1, 16, 16) and digits.dtype == torch.uint8 and digits.max() == 255
    array = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", arr_0=array)
    loaded = load_real_images(str(tmp_path / "ref.npz"))
    assert loaded.shape == (5, 3, 8, 8) and torch.equal(loaded.permute(0, 2, 3, 1), torch.from_numpy(array))
    np.savez(tmp_path / "bad.npz", arr_0=array.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        load_real_images(str(tmp_path / "bad.npz"))
    with pytest.raises(ValueError, match="'rgb_patches' or an existing .npz"):
        load_real_images(str(tmp_path / "nothing.npz"))
    patches = load_real_images("rgb_patches")  # the RGB reference's own FID reference
    assert patches.shape == (2048, 3, 16, 16) and patches.dtype == torch.uint8


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """The reference model at 3 bits, plain VQ (k-means, n = 1), as a packed folder."""
    model = load_reference_model()
    quantize_(model, VQConfig.from_bits(3).with_overrides(num_candidates=1, kmeans_iters=5),
              filter_fn=default_linear_filter, progress=False)
    for layer in vq_layers(model).values():
        layer.finalize_()
    return save_quantized(model, tmp_path_factory.mktemp("packed") / "w3")


def eval_args(subcommand, tmp_path, *extra):
    return [
        subcommand, "--config", "configs/demo.yaml",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--sample_writer.output_dir={tmp_path / 'samples'}",
        "--data.eval_samples=12", "--data.eval_batch_size=5", "--data.eval_num_steps=4",
        "--data.eval_guidance_scale=1.5", "--data.num_steps=4", *extra,
    ]


def test_predict_writes_pngs_and_sample_ddp_npz(tmp_path, packed):
    cli_main(eval_args("predict", tmp_path, f"--model.evaluation.quantized={packed}"))
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(12)]
    with np.load(tmp_path / "samples.npz") as archive:
        assert archive.files == ["arr_0"]
        samples = archive["arr_0"]
    assert samples.shape == (12, 16, 16, 3) and samples.dtype == np.uint8
    labels = [int(line) for line in (tmp_path / "samples" / "labels.txt").read_text().split()]
    assert labels == [i % 10 for i in range(12)]
    # the same images as sampling the packed model directly with the evaluation plan
    plan_labels, seeds = evaluation_plan(12, 10)
    direct = generate_images(load_quantized(packed), plan_labels, seeds, FAST)
    expected = (direct.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(samples.astype(int) - expected.astype(int)).max() <= 1


def test_predict_fp_model(tmp_path, reference):
    cli_main(eval_args("predict", tmp_path, "--model.evaluation.model=fp"))
    with np.load(tmp_path / "samples.npz") as archive:
        samples = archive["arr_0"]
    labels, seeds = evaluation_plan(12, 10)
    expected = generate_images(reference, labels, seeds, FAST)
    expected = (expected.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    assert np.abs(samples.astype(int) - expected.astype(int)).max() <= 1


def test_test_subcommand_reports_metrics_and_writes_grid(tmp_path, packed):
    cli = cli_main(eval_args("test", tmp_path, f"--model.evaluation.quantized={packed}"))
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    expected = {"test/class_accuracy", "test/fid", "test/precision", "test/recall", "test/inception_score",
                "test/mse_to_fp", "test/fid_to_fp"}
    assert expected <= set(metrics)
    assert 0.0 < metrics["test/mse_to_fp"] < 1.0 and 0.0 <= metrics["test/class_accuracy"] <= 1.0
    assert list(tmp_path.rglob("test/fp_vs_quantized.png"))
    cli = cli_main(eval_args("validate", tmp_path / "v", f"--model.evaluation.quantized={packed}", "--data.val_trajectories=1"))
    assert float(cli.trainer.callback_metrics["val/block_mse"]) > 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.evaluation.quantized={tmp}/nothing", "not a packed vq4dit model folder"),
        ("--model.evaluation.real_images={tmp}/nothing.npz", "real_images must be"),
        ("--data.eval_samples=0", "eval_samples"),
        ("--model.evaluation.metrics_features=clip", "metrics_features"),
        ("--model.model=tiny --model.evaluation.metrics_features=classifier", "needs a shipped reference model"),
    ],
)
def test_bad_evaluation_input_fails_with_one_clear_line(tmp_path, override, message, monkeypatch, capsys):
    from tests.test_trust import error_lines, run_main

    code, stderr = run_main(monkeypatch, capsys, [*eval_args("test", tmp_path, "--model.evaluation.model=fp"),
                                                  *override.format(tmp=tmp_path).split()])
    assert code == 2, stderr[-2000:]
    (line,) = error_lines(stderr)
    assert message in line and "Traceback" not in stderr


def test_a_pipelines_vae_loads_from_vae_and_decodes_with_its_own_scaling_factor(tmp_path):
    from diffusers import AutoencoderKL

    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",), norm_num_groups=4,
        sample_size=8, scaling_factor=0.13025,  # PixArt-Σ's (SDXL) VAE
    ).save_pretrained(tmp_path / "pipe" / "vae")
    vae = load_vae(str(tmp_path / "pipe"))
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = ((vae.decode(latents / 0.13025).sample + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(decode(latents, vae), expected)
    assert not torch.allclose(decode(latents, vae), ((vae.decode(latents / 0.18215).sample + 1) / 2).clamp(0, 1))
