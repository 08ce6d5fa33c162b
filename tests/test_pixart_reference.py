"""The shipped text-conditioned reference (issue 21 item 4): a trained tiny PixArt on the digits with
its own text path; its prompts file; its training loop; ``train.py test`` / ``predict`` on it."""

import numpy as np
import pytest
import torch
from diffusers import PixArtTransformer2DModel

from tools.train_pixart_reference import (
    PixArtReferenceConfig, build_text_dit, caption_tokens, text_forward_of,
)
from vq4dit.families import PIXART
from vq4dit.families.guidance import sample_conditioned
from vq4dit.models import load_dit
from vq4dit.pixart_reference import (
    CALIBRATION_PROMPTS, PIXART_ASSETS_DIR, calibration_prompts, load_pixart_reference_text, prompt_text,
)
from vq4dit.prompts import load_prompt_embeds, prompt_classes, prompt_condition
from vq4dit.prompts.encode import encode_prompts
from vq4dit.reference import classifier_accuracy, load_reference_classifier
from vq4dit.sampling import NULL_CLASS, SamplerConfig


@pytest.fixture(scope="module")
def model():
    return load_dit("pixart_reference")


def test_the_shipped_model_is_a_float32_pixart_with_its_text_path_and_prompts(model):
    assert type(model) is PixArtTransformer2DModel and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tokenizer, encoder = load_pixart_reference_text()
    prompts = load_prompt_embeds(CALIBRATION_PROMPTS)
    assert prompts["prompt_embeds"].shape == (40, 8, model.config.caption_channels)
    texts, digits = calibration_prompts(40)
    assert (PIXART_ASSETS_DIR / "calibration_prompts.txt").read_text().splitlines() == texts
    assert torch.equal(prompt_classes(CALIBRATION_PROMPTS), digits) and digits[:12].tolist() == [*range(10), 0, 1]
    again = encode_prompts(tokenizer, encoder, texts, max_length=8, progress=False)  # the file is this encoder's
    assert all(torch.allclose(again[k].float(), prompts[k].float()) for k in prompts)


def test_the_word_tokenizer_ends_every_prompt_and_names_unknown_words():
    tokenizer, _ = load_pixart_reference_text()
    tokens = tokenizer(["", "A handwritten SEVEN.", "an image of the digit 7"])
    assert tokens["attention_mask"].sum(1).tolist() == [1, 4, 7]
    end = tokenizer.ids["<end>"]
    assert tokens["input_ids"][0, 0] == end and tokens["input_ids"][1, 3] == end
    assert tokenizer(["seven"])["input_ids"][0, 0] == tokenizer.ids["seven"]
    with pytest.raises(ValueError, match="'purple'.*it knows: zero one"):
        tokenizer(["a purple seven"])


@torch.no_grad()
def test_samples_show_the_digit_the_prompt_names(model):
    """Real computation: 20 samples of 10 prompts (2 templates x digits 0-9) at 10 DDPM steps are
    mostly classified as their prompt's digit; the same noise under shuffled prompts is not."""
    tokenizer, encoder = load_pixart_reference_text()
    digits = torch.arange(20) % 10
    texts = [prompt_text(int(d), 5 if i < 10 else 4) for i, d in enumerate(digits)]  # "a handwritten ..", "the number .."
    prompts = encode_prompts(tokenizer, encoder, texts, max_length=8, progress=False)
    config = SamplerConfig(num_steps=10, guidance_scale=4.0, clip_denoised=True)
    seeds = list(range(20))
    images = sample_conditioned(PIXART, model, prompt_condition(prompts, torch.arange(20)), seeds, config)
    classifier = load_reference_classifier()
    accuracy = classifier_accuracy(classifier, images.clamp(-1, 1), digits)
    shifted = sample_conditioned(PIXART, model, prompt_condition(prompts, (torch.arange(20) + 3) % 20), seeds, config)
    assert accuracy >= 0.7, accuracy
    assert classifier_accuracy(classifier, shifted.clamp(-1, 1), digits) <= 0.3  # the text, not the noise, decides


def test_the_text_loop_trains_transformer_and_encoder_from_captions_and_the_empty_prompt():
    config = PixArtReferenceConfig(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_channels=8)
    model = build_text_dit(config, 1)
    blocks = model.transformer.transformer_blocks
    assert float(blocks[0].attn2.to_out[0].weight.abs().sum()) == 0.0  # cross-attention starts closed
    ids, masks = caption_tokens()
    assert ids.shape == (11, 8, 8) and masks[10].sum(1).tolist() == [1] * 8  # row 10: the empty prompt
    forward = text_forward_of(ids, masks)
    x = torch.randn(4, 1, 16, 16)
    out = forward(model, x, torch.tensor([1, 100, 500, 999]), torch.tensor([3, NULL_CLASS, 7, 0]),
                  torch.Generator().manual_seed(0))
    assert out.shape == (4, 2, 16, 16)
    out.pow(2).mean().backward()
    assert model.text.token.weight.grad is not None and model.transformer.proj_out.weight.grad is not None


def test_train_py_test_and_predict_score_a_text_model_by_the_digits_its_prompts_name(tmp_path):
    from train import cli_main

    common = ["--config", "configs/pixart_reference.yaml", "--model.evaluation.model=fp",
              "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
              f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
              "--data.eval_samples=20", "--data.eval_batch_size=10", "--data.eval_num_steps=10",
              f"--sample_writer.output_dir={tmp_path / 'samples'}"]
    cli = cli_main(["test", *common])
    metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items()}
    assert {"test/class_accuracy", "test/fid"} <= set(metrics)
    assert metrics["test/class_accuracy"] >= 0.6, metrics  # sample i: prompt i mod 40, digit i mod 10
    cli_main(["predict", *common])
    with np.load(tmp_path / "samples.npz") as archive:
        assert archive["arr_0"].shape == (20, 16, 16, 3)
    labels = [int(line) for line in (tmp_path / "samples" / "labels.txt").read_text().split()]
    assert labels == list(range(20))  # a text model's labels are its prompt indices


def reference_fit(tmp_path, *extra):
    return ["fit", "--config", "configs/pixart_reference.yaml", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.export.dir={tmp_path / 'packed'}",
            "--data.num_trajectories=1", "--data.classes_per_trajectory=2", "--data.num_steps=4",
            "--data.val_trajectories=1", "--trainer.max_epochs=1", f"--data.cache_dir={tmp_path / 'cache'}", *extra]


def test_fit_encodes_prompt_text_once_with_the_models_own_text_encoder_and_calibrates(tmp_path):
    from train import cli_main
    from vq4dit import load_quantized
    from vq4dit.lightning.data import CalibrationDataModule

    text = tmp_path / "prompts.txt"
    text.write_text("a handwritten seven\nthe number 3\n\nzero written by hand\n", encoding="utf-8")
    cli = cli_main(reference_fit(tmp_path, f"--data.prompts={text}"))  # replaces the config's embeddings file
    data = cli.datamodule
    assert data.prompts["prompt_embeds"].shape == (3, 8, 32) and data.prompt_classes is None
    (cached,) = (tmp_path / "cache" / "prompt_embeds").glob("prompts-*.safetensors")
    tokenizer, encoder = load_pixart_reference_text()  # the model source's own text encoder
    expected = encode_prompts(tokenizer, encoder, ["a handwritten seven", "the number 3", "zero written by hand"],
                              max_length=8, progress=False)
    assert torch.allclose(data.prompts["prompt_embeds"], expected["prompt_embeds"])
    assert set(data.train_items["prompt_index"].tolist()) == {0, 1}  # 1 trajectory x 2 prompts
    assert type(load_quantized(tmp_path / "packed")) is PixArtTransformer2DModel
    stamp = cached.stat().st_mtime_ns
    again = CalibrationDataModule(prompts=str(text), cache_dir=str(tmp_path / "cache"))
    again._encode_prompts("pixart_reference")
    assert cached.stat().st_mtime_ns == stamp and again.embeds_file == str(cached)  # encoded once


@pytest.mark.parametrize("extra, message", [
    (["--data.prompts={text}", "--data.prompt_embeds={embeds}"], "give the calibration prompts once"),
    (["--data.prompts={bad}"], "'purple'"),
    (["--data.prompts={empty}"], "holds no prompt"),
])
def test_a_prompt_source_mistake_is_one_error_line_before_the_trajectories(tmp_path, monkeypatch, capsys, extra, message):
    from tests.test_trust import error_lines, run_main

    paths = {"text": tmp_path / "p.txt", "bad": tmp_path / "bad.txt", "empty": tmp_path / "empty.txt",
             "embeds": CALIBRATION_PROMPTS}
    paths["text"].write_text("seven\n")
    paths["bad"].write_text("a purple seven\n")
    paths["empty"].write_text("\n")
    code, err = run_main(monkeypatch, capsys, reference_fit(tmp_path, *(e.format(**paths) for e in extra)))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert message in line, line


def test_generate_images_samples_a_text_model_from_prompt_rows(model):
    from vq4dit.evaluation import decode, generate_images

    prompts = load_prompt_embeds(CALIBRATION_PROMPTS)
    config = SamplerConfig(num_steps=3, guidance_scale=4.0, clip_denoised=True)
    rows, seeds = torch.tensor([7, 0, 33]), [4, 5, 6]
    images = generate_images(model, rows, seeds, config, batch_size=2, prompts=prompts)
    direct = decode(sample_conditioned(PIXART, model, prompt_condition(prompts, rows), seeds, config))
    torch.testing.assert_close(images, direct, atol=1e-4, rtol=0)  # batches of 2 change nothing (float noise)
