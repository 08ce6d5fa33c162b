"""The shipped MMDiT reference (issue 22): a trained tiny SD3Transformer2DModel on the digits with its
own mean-pooled text path; its scheduler's shift; its prompts file and the encode command; its
flow-matching training loop; ``train.py fit`` on its config."""

import json

import pytest
import torch
from diffusers import SD3Transformer2DModel
from torch import nn

from tools.diffusion_training import DDPMObjective, FlowMatchingObjective
from tools.text_reference import caption_tokens, text_forward_of
from tools.train_mmdit_reference import MMDiTReferenceConfig, build_joint_dit, write_scheduler
from vq4dit.families import SD3
from vq4dit.families.guidance import sample_conditioned
from vq4dit.flow_matching import SCHEDULER_SHIFT_KEY, FlowMatchSampler
from vq4dit.mmdit_reference import MMDIT_ASSETS_DIR, MMDIT_CALIBRATION_PROMPTS, load_mmdit_reference_text
from vq4dit.models import load_dit
from vq4dit.pixart_reference import calibration_prompts, prompt_text
from vq4dit.prompts import load_prompt_embeds, prompt_classes, prompt_condition
from vq4dit.prompts.encode import encode_prompts, with_mean_pooled
from vq4dit.reference import classifier_accuracy, load_reference_classifier
from vq4dit.sampling import NULL_CLASS, SamplerConfig

TINY = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8, caption_channels=8, caption_projection_dim=16)


@pytest.fixture(scope="module")
def model():
    return load_dit("mmdit_reference")


def test_the_shipped_model_is_a_float32_sd3_with_its_shift_text_path_and_pooled_prompts(model):
    assert type(model) is SD3Transformer2DModel and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config[SCHEDULER_SHIFT_KEY] == 1.0 and SD3.sampler.shift_of(model) == 1.0  # not SD3's 3.0
    prompts = load_prompt_embeds(MMDIT_CALIBRATION_PROMPTS)
    assert prompts["prompt_embeds"].shape == (40, 8, model.config.joint_attention_dim)
    assert prompts["pooled_prompt_embeds"].shape == (40, model.config.pooled_projection_dim)
    texts, digits = calibration_prompts(40)
    assert (MMDIT_ASSETS_DIR / "calibration_prompts.txt").read_text().splitlines() == texts
    assert torch.equal(prompt_classes(MMDIT_CALIBRATION_PROMPTS), digits)
    tokenizer, encoder = load_mmdit_reference_text()
    assert encoder.pooled == "mean"
    again = with_mean_pooled(encode_prompts(tokenizer, encoder, texts, max_length=8, progress=False))
    assert all(torch.allclose(again[k].float(), prompts[k].float()) for k in prompts)  # the file is this encoder's
    mask = prompts["prompt_attention_mask"][:, :, None]
    assert torch.allclose(prompts["pooled_prompt_embeds"], (prompts["prompt_embeds"] * mask).sum(1) / mask.sum(1))


def test_the_encode_command_writes_the_pooled_embeddings_without_transformers(tmp_path, capsys):
    from vq4dit.prompts.__main__ import main

    text = tmp_path / "p.txt"
    text.write_text("a handwritten seven\nthe number 3\n")
    assert main(["encode", "--pipeline", "mmdit_reference", "--prompts", str(text), "--out", str(tmp_path / "e.safetensors")]) == 0
    embeds = load_prompt_embeds(tmp_path / "e.safetensors")
    assert embeds["prompt_embeds"].shape == (2, 8, 32) and embeds["pooled_prompt_embeds"].shape == (2, 32)
    assert embeds["negative_pooled_prompt_embeds"].shape == (1, 32)
    assert main(["encode", "--pipeline", "mmdit_reference", "--prompts", str(text), "--out", str(tmp_path / "e.safetensors"),
                 "--max-length", "0"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@torch.no_grad()
def test_samples_show_the_digit_the_prompt_names(model):
    """Real computation: 20 samples of 10 prompts (2 templates x digits 0-9) at 10 Euler steps are
    mostly classified as their prompt's digit; the same noise under shuffled prompts is not."""
    tokenizer, encoder = load_mmdit_reference_text()
    digits = torch.arange(20) % 10
    texts = [prompt_text(int(d), 5 if i < 10 else 4) for i, d in enumerate(digits)]
    prompts = with_mean_pooled(encode_prompts(tokenizer, encoder, texts, max_length=8, progress=False))
    config = SamplerConfig(num_steps=10, guidance_scale=4.0)
    seeds = list(range(20))
    images = sample_conditioned(SD3, model, prompt_condition(prompts, torch.arange(20)), seeds, config)
    classifier = load_reference_classifier()
    accuracy = classifier_accuracy(classifier, images.clamp(-1, 1), digits)
    shifted = sample_conditioned(SD3, model, prompt_condition(prompts, (torch.arange(20) + 3) % 20), seeds, config)
    assert accuracy >= 0.7, accuracy
    assert classifier_accuracy(classifier, shifted.clamp(-1, 1), digits) <= 0.3  # the text, not the noise, decides


def test_the_shift_comes_from_the_pipelines_scheduler_config_else_sd3s(tmp_path):
    config = MMDiTReferenceConfig(**TINY)
    transformer = build_joint_dit(config, 1).transformer
    transformer.save_pretrained(tmp_path / "pipe" / "transformer")
    transformer.save_pretrained(tmp_path / "alone")
    assert SD3.sampler.shift_of(load_dit(str(tmp_path / "alone"))) == 3.0  # no scheduler: SD3's
    assert SD3.sampler.shift_of(load_dit(str(tmp_path / "pipe" / "transformer"))) == 3.0
    write_scheduler(tmp_path / "pipe", config)
    (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").write_text(json.dumps({"shift": 2.0}))
    loaded = load_dit(str(tmp_path / "pipe" / "transformer"))
    assert SD3.sampler.shift_of(loaded) == 2.0
    sigmas, _ = SD3.sampler.schedule(loaded, 4, 1000, (1, 16, 16))
    assert torch.allclose(sigmas, FlowMatchSampler(2.0).schedule(loaded, 4, 1000, (1, 16, 16))[0])
    assert SD3.sampler.shift_of(load_dit(str(tmp_path / "pipe"))) == 2.0  # the pipeline folder itself


def test_the_flow_loop_trains_transformer_and_encoder_on_velocities():
    config = MMDiTReferenceConfig(**TINY)
    model = build_joint_dit(config, 1)
    block = model.transformer.transformer_blocks[0]
    assert float(block.norm1.linear.weight.abs().sum()) == 0.0  # adaLN-Zero: blocks start as the identity
    ids, masks = caption_tokens()
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    objective = FlowMatchingObjective()
    xt, timesteps, state = objective.noisy(x0, torch.Generator().manual_seed(0))
    assert timesteps.shape == (4,) and bool(((timesteps > 0) & (timesteps < 1000)).all())
    s = (timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(xt, (1 - s) * x0 + s * state[0], atol=1e-6)
    out = text_forward_of(ids, masks)(model, xt, timesteps, torch.tensor([3, NULL_CLASS, 7, 0]), torch.Generator())
    assert out.shape == x0.shape
    terms = objective.losses(out, x0, xt, state)
    assert set(terms) == {"mse"} and terms["mse"].shape == (4,)
    terms["mse"].mean().backward()
    assert model.text.token.weight.grad is not None and model.transformer.proj_out.weight.grad is not None
    assert set(DDPMObjective().losses(torch.zeros(4, 2, 16, 16), x0, x0, (torch.zeros(4, dtype=torch.long), x0))) == {"mse", "vb"}


def test_fit_on_the_config_exports_a_packed_mmdit_with_modulation_fp_when_asked(model, tmp_path):
    from train import cli_main
    from vq4dit import load_quantized

    default = SD3.linear_filter()
    assert default(model.transformer_blocks[0].norm1.linear, "transformer_blocks.0.norm1.linear")  # quantized by default
    cli_main(["fit", "--config", "configs/mmdit_reference.yaml", "--trainer.enable_progress_bar=false",
              "--trainer.enable_model_summary=false", f"--trainer.default_root_dir={tmp_path}",
              f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.export.dir={tmp_path / 'packed'}",
              "--data.num_trajectories=1", "--data.classes_per_trajectory=2", "--data.num_steps=3",
              "--data.val_trajectories=1", "--trainer.max_epochs=1", f"--data.cache_dir={tmp_path / 'cache'}",
              "--trainer.callbacks=[]", '--model.layers.options={"quantize_modulation": false}'])
    packed = load_quantized(tmp_path / "packed")
    assert type(packed) is SD3Transformer2DModel and SD3.sampler.shift_of(packed) == 1.0  # the packed save keeps it
    block = packed.transformer_blocks[0]
    assert type(block.norm1.linear) is nn.Linear and type(block.norm1_context.linear) is nn.Linear
    assert type(block.attn.to_q) is not nn.Linear and type(block.ff_context.net[2]) is not nn.Linear  # quantized


@pytest.mark.parametrize("flag", ["--data.sampler=ddim", "--data.eval_sampler=ddpm"])
def test_a_ddpm_or_ddim_sampler_for_a_flow_matching_model_is_one_error_line(tmp_path, monkeypatch, capsys, flag):
    """A sampler choice the SD3 family would ignore is refused before the trajectories, in one line."""
    from tests.test_trust import error_lines, run_main

    code, err = run_main(monkeypatch, capsys, [
        "fit", "--config", "configs/mmdit_reference.yaml", f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.export.dir={tmp_path / 'packed'}",
        f"--data.cache_dir={tmp_path / 'cache'}", flag])
    assert code == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert f"--data.{flag.split('.')[1].split('=')[0]} " in line and "does not apply to SD3 models" in line, line
    assert "flow matching" in line and not (tmp_path / "cache").exists() and not (tmp_path / "packed").exists()
