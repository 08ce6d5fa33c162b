"""MMDiT (issue 22): the SD3 / SD3.5 family on tiny random ``SD3Transformer2DModel`` s: default layer
sets, the pipeline's call, block losses over both streams, pooled prompt files, flow-matching
trajectories against the stock pipeline, ``train.py fit`` end to end with the packed transformer in
the stock ``StableDiffusion3Pipeline``, and ``train.py predict`` (CPU, offline, ~11 s)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from torch import nn

from tests.test_calibration import fit_args
from tests.test_evaluation import eval_args
from tests.test_families import tiny_pixart
from tests.test_prompts import embeddings, write_embeddings
from tests.test_trust import error_lines, run_main
from train import cli_main
from vq4dit import load_quantized
from vq4dit.engine import block_losses
from vq4dit.evaluation import decode
from vq4dit.families import PIXART, SD3, PooledTextPrompts, call_model, conditioning_of, family_of
from vq4dit.families.guidance import sample_conditioned
from vq4dit.flow_matching import flow_schedule
from vq4dit.prompts import check_prompts_fit, load_prompt_embeds, prompt_condition
from vq4dit.quantize import vq_layers
from vq4dit.sampling import SamplerConfig, initial_noise
from vq4dit.trajectories import TrajectoryPlan, cached_items

TOKENS, JOINT, POOLED = 5, 12, 10
SD35 = dict(dual_attention_layers=(0,), qk_norm="rms_norm")  # SD3.5's second image attention and qk-norm


def tiny_sd3(**config) -> SD3Transformer2DModel:
    """A random 2-block SD3 (16 wide, 8x8 latents of 4 channels, T5-like context of 12 channels,
    pooled CLIP of 10); ``SD35``: SD3.5's ``attn2`` in block 0 and qk RMS-norm."""
    torch.manual_seed(0)
    base = dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=JOINT, caption_projection_dim=16,
                pooled_projection_dim=POOLED, pos_embed_max_size=16)
    model = SD3Transformer2DModel(**{**base, **config}).eval()
    with torch.no_grad():  # diffusers zero-initialises the modulation and the output head
        for name, parameter in model.named_parameters():
            if ("linear" in name or "proj_out" in name) and not parameter.any():
                parameter.normal_(0, 0.3)
    return model


def sd3_embeddings(count: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A valid pooled prompt-embeddings dict for :func:`tiny_sd3` (masks all ones, as SD3's pipeline has none)."""
    g = torch.Generator().manual_seed(seed + 1)
    tensors = embeddings(count, TOKENS, JOINT, seed)
    ones = torch.ones(count, TOKENS, dtype=torch.long)
    return {**tensors, "prompt_attention_mask": ones, "negative_prompt_attention_mask": ones[:1].clone(),
            "pooled_prompt_embeds": torch.randn(count, POOLED, generator=g),
            "negative_pooled_prompt_embeds": torch.randn(1, POOLED, generator=g)}


def sd3_batch(count: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    """``count`` items (x, float t, prompts 0..count-1) with the negative prompt."""
    g = torch.Generator().manual_seed(seed)
    prompts = sd3_embeddings(count)
    return {"x": torch.randn(count, 4, 8, 8, generator=g), "t": torch.linspace(900.0, 100.0, count),
            **prompt_condition(prompts, torch.arange(count))}


@pytest.mark.parametrize("config, attn2", [({}, 0), (SD35, 1)])
def test_the_default_set_is_every_joint_linear_with_the_modulation_and_the_option_keeps_it_fp(config, attn2):
    model = tiny_sd3(**config)
    assert family_of(model) is SD3
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = {name for name, module in model.named_modules() if SD3.linear_filter()(module, name)}
    per_block = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                 "attn.to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "norm1_context.linear"]
    first = {f"transformer_blocks.0.{n}" for n in per_block + ["attn.to_add_out", "ff_context.net.0.proj",
                                                               "ff_context.net.2"]}
    first |= {f"transformer_blocks.0.attn2.{n}" for n in ("to_q", "to_k", "to_v", "to_out.0")} if attn2 else set()
    last = {f"transformer_blocks.1.{n}" for n in per_block}  # context_pre_only: no to_add_out, no ff_context
    assert chosen == first | last
    assert linears - chosen == {"context_embedder", "norm_out.linear", "proj_out", "time_text_embed.text_embedder.linear_1",
                                "time_text_embed.text_embedder.linear_2", "time_text_embed.timestep_embedder.linear_1",
                                "time_text_embed.timestep_embedder.linear_2"}
    fp_modulation = {name for name, module in model.named_modules()
                     if SD3.linear_filter(quantize_modulation=False)(module, name)}
    assert chosen - fp_modulation == {f"transformer_blocks.{i}.{n}" for i in (0, 1)
                                      for n in ("norm1.linear", "norm1_context.linear")}
    with pytest.raises(ValueError, match="SD3 models have no layer option 'quantize_adaln'; options: quantize_modulation"):
        SD3.linear_filter(quantize_adaln=True)


def test_the_family_calls_the_model_as_the_pipeline_does_and_its_batches_carry_the_pooled_prompt():
    model, batch = tiny_sd3(**SD35), sd3_batch()
    with torch.no_grad():
        out = call_model(model, batch)
        same = model(batch["x"], encoder_hidden_states=batch["prompt_embeds"],
                     pooled_projections=batch["pooled_prompt_embeds"], timestep=batch["t"]).sample
        other = call_model(model, {**batch, "pooled_prompt_embeds": batch["pooled_prompt_embeds"] + 1})
    assert torch.equal(out, same) and out.shape == (2, 4, 8, 8) and not torch.allclose(out, other)
    assert isinstance(conditioning_of(batch), PooledTextPrompts)
    doubled = SD3.conditioning.with_unconditional(batch)
    assert torch.equal(doubled["pooled_prompt_embeds"][2:], batch["negative_pooled_prompt_embeds"].expand(2, -1))
    assert torch.equal(doubled["prompt_embeds"][:2], batch["prompt_embeds"]) and doubled["x"].shape[0] == 4
    items = {"x": batch["x"], "t": batch["t"], "prompt_index": torch.tensor([1, 0]), **sd3_embeddings(2)}
    picked = conditioning_of(items).batch(items, torch.tensor([0]))
    assert torch.equal(picked["pooled_prompt_embeds"], items["pooled_prompt_embeds"][1:2])


def test_block_losses_cover_both_streams_and_the_last_block_without_a_context_stream():
    teacher, batch = tiny_sd3(), sd3_batch()
    assert teacher.transformer_blocks[1].context_pre_only
    for stream in ("ff_context.net.2", "ff.net.2"):  # block 0: the text stream, then the image stream alone
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            student.transformer_blocks[0].get_submodule(stream).weight.add_(0.05)
        for inputs in ("student", "teacher"):
            block_mse, output_mse = block_losses(teacher, student, batch, block_inputs=inputs)
            assert block_mse[0] > 0 and torch.isfinite(block_mse).all(), (stream, inputs)
            assert (block_mse[1] > 0) == (inputs == "student")  # teacher inputs: block 1 sees the true input
    same, _ = block_losses(teacher, copy.deepcopy(teacher), batch)
    assert torch.equal(same, torch.zeros(2))


def test_pooled_prompt_files_are_required_for_sd3_and_refused_for_pixart(tmp_path):
    path = write_embeddings(tmp_path / "p.safetensors", sd3_embeddings())
    prompts = load_prompt_embeds(path)
    assert prompts["pooled_prompt_embeds"].shape == (3, POOLED) and prompts["pooled_prompt_embeds"].dtype == torch.float32
    check_prompts_fit(tiny_sd3(), prompts, str(path))
    condition = prompt_condition(prompts, torch.tensor([2, 0]))
    assert torch.equal(condition["pooled_prompt_embeds"], prompts["pooled_prompt_embeds"][[2, 0]])
    plain = load_prompt_embeds(write_embeddings(tmp_path / "e.safetensors", embeddings(3, TOKENS, JOINT)))
    for model, given, message in ((tiny_sd3(), plain, "SD3 model needs pooled embeddings"),
                                  (tiny_pixart(), load_prompt_embeds(write_embeddings(
                                      tmp_path / "x.safetensors", {**sd3_embeddings(), **embeddings()})),
                                   "PixArt model takes no pooled embeddings")):
        with pytest.raises(ValueError, match=message) as raised:
            check_prompts_fit(model, given, "f.safetensors")
        assert "f.safetensors" in str(raised.value) and family_of(model) in (SD3, PIXART)
    wide = {**sd3_embeddings(), "pooled_prompt_embeds": torch.randn(3, POOLED + 1),
            "negative_pooled_prompt_embeds": torch.randn(1, POOLED + 1)}
    with pytest.raises(ValueError, match="pooled_prompt_embeds have 11 channels, but the model's pooled_projection_dim is 10"):
        check_prompts_fit(tiny_sd3(), load_prompt_embeds(write_embeddings(tmp_path / "w.safetensors", wide)), "w")


@pytest.mark.parametrize("changes, message", [
    ({"negative_pooled_prompt_embeds": None}, "lacks negative_pooled_prompt_embeds"),
    ({"pooled_prompt_embeds": torch.randn(2, POOLED)}, "do not match 3 prompts"),
    ({"negative_pooled_prompt_embeds": torch.randn(1, POOLED + 1)}, "do not match 3 prompts"),
    ({"pooled_prompt_embeds": torch.randn(3, 2, POOLED)}, "pooled_prompt_embeds is (3, 2, 10)"),
    ({"negative_pooled_prompt_embeds": torch.ones(1, POOLED, dtype=torch.long)}, "expected a floating [1, P]"),
    ({"pooled_prompt_embeds": torch.full((3, POOLED), float("nan"))}, "pooled_prompt_embeds holds NaN/Inf"),
])
def test_every_malformed_pooled_file_is_one_value_error_naming_the_file(tmp_path, changes, message):
    path = write_embeddings(tmp_path / "bad.safetensors", sd3_embeddings(), **changes)
    with pytest.raises(ValueError, match="prompt embeddings .*bad.safetensors") as raised:
        load_prompt_embeds(path)
    assert message in str(raised.value) and "\n" not in str(raised.value)


# --- flow-matching trajectories -------------------------------------------------------------------

@pytest.mark.parametrize("steps, shift", [(4, 3.0), (7, 1.0), (1, 3.0)])
def test_the_flow_schedule_is_the_diffusers_schedulers(steps, shift):
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(steps)
    sigmas, timesteps = flow_schedule(steps, shift)
    assert torch.equal(sigmas, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)


NO_TEXT = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3",
                         "image_encoder", "feature_extractor"))  # the pipeline then takes embeddings


def stock_pipeline(transformer: nn.Module) -> StableDiffusion3Pipeline:
    """``StableDiffusion3Pipeline`` on ``transformer`` with SD3's scheduler and no text encoders or
    VAE: it takes embeddings and returns latents (``output_type="latent"``)."""
    return StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=None, **NO_TEXT)


def pipeline_latents(transformer: nn.Module, condition: dict, latents: torch.Tensor, steps: int, guidance: float):
    """The pipeline's final latents and every step's input latents ``[(x_t [B, C, H, W], t)]``."""
    seen = [latents.clone()]

    def keep(_pipe, _i, _t, kwargs):
        seen.append(kwargs["latents"].clone())
        return {}

    final = stock_pipeline(transformer)(
        prompt_embeds=condition["prompt_embeds"], pooled_prompt_embeds=condition["pooled_prompt_embeds"],
        negative_prompt_embeds=condition["negative_prompt_embeds"].expand_as(condition["prompt_embeds"]),
        negative_pooled_prompt_embeds=condition["negative_pooled_prompt_embeds"].expand_as(condition["pooled_prompt_embeds"]),
        latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
        output_type="latent", callback_on_step_end=keep).images
    return final, seen[:-1]


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_the_teachers_trajectories_are_the_sd3_pipelines_with_its_scheduler(tmp_path, guidance):
    teacher = tiny_sd3(**SD35)
    prompts = load_prompt_embeds(write_embeddings(tmp_path / "p.safetensors", sd3_embeddings()))
    plan = TrajectoryPlan(0, 2, 3, SamplerConfig(num_steps=4, guidance_scale=guidance), prompts_digest="a" * 64)
    items = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert items["x"].shape == (16, 4, 8, 8) and items["prompt_index"][:4].tolist() == [0, 1, 2, 0]
    assert items["pooled_prompt_embeds"] is prompts["pooled_prompt_embeds"] and items["t"].dtype == torch.float32
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(4)
    assert torch.equal(items["t"][::4], scheduler.timesteps)  # the model's float timestep (1000 sigma), noisiest first
    seeds = plan.labels_and_seeds(0)[1] + plan.labels_and_seeds(1)[1]
    condition = prompt_condition(prompts, torch.tensor([0, 1, 2, 0]))
    final, seen = pipeline_latents(teacher, condition, initial_noise((4, 8, 8), seeds, "cpu"), 4, guidance)
    ours, trajectory = sample_conditioned(SD3, teacher, condition, seeds, plan.sampler, record_trajectory=True)
    torch.testing.assert_close(ours, final, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([x for x, _ in trajectory]), torch.cat(seen), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(items["x"], torch.cat(seen), rtol=1e-4, atol=1e-5)  # the items are those x_t
    again = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert all(torch.equal(again[key], items[key]) for key in items)


# --- train.py fit end to end, the packed transformer in the stock pipeline ------------------------

SMALL = ["--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_trajectories=2",
         "--data.classes_per_trajectory=2", "--data.num_steps=6", "--trainer.max_epochs=3"]
FP_MODULATION = '--model.layers.options={"quantize_modulation": false}'


def tiny_vae() -> AutoencoderKL:
    """A random 2-level VAE (8x8x4 latents of 16x16 images) with an SD3-style shift factor."""
    torch.manual_seed(1)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, scaling_factor=1.5, shift_factor=0.1).eval()


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny SD3.5 pipeline folder (no text encoders), its pooled prompts, and ``train.py fit`` of
    it twice: ``packed`` (modulation quantized, the default) and ``fp_modulation/packed``."""
    root = tmp_path_factory.mktemp("sd3")
    pipe = stock_pipeline(tiny_sd3(**SD35))
    pipe.register_modules(vae=tiny_vae())
    pipe.save_pretrained(root / "pipeline")
    embeds = write_embeddings(root / "e.safetensors", sd3_embeddings())
    for out, extra in ((root, []), (root / "fp_modulation", [FP_MODULATION])):
        cli_main(fit_args(out, *extra, model=["--model.model", str(root / "pipeline"), "--data.prompt_embeds",
                                              str(embeds), *SMALL]))
    return root, embeds


def relative_error(packed: nn.Module, fp: nn.Module, batch: dict) -> float:
    with torch.no_grad():
        reference = call_model(fp, batch)
        return float((call_model(packed, batch) - reference).norm() / reference.norm())


def test_fit_calibrates_an_sd3_folder_and_stock_from_pretrained_loads_the_packed_transformer(fitted):
    root, _ = fitted
    fp = SD3Transformer2DModel.from_pretrained(root / "pipeline" / "transformer")
    packed = SD3Transformer2DModel.from_pretrained(root / "packed")  # stock diffusers, vq4dit's backend
    fp_modulation = SD3Transformer2DModel.from_pretrained(root / "fp_modulation" / "packed")
    assert len(vq_layers(packed)) == 29 and len(vq_layers(fp_modulation)) == 25  # 4 modulation Linears FP
    assert not any("norm1" in name for name in vq_layers(fp_modulation))
    batch = sd3_batch(3, seed=11)
    with torch.no_grad():
        assert torch.equal(call_model(load_quantized(root / "packed"), batch), call_model(packed, batch))
    errors = [relative_error(model, fp, batch) for model in (packed, fp_modulation)]
    assert all(0 < error < 0.1 for error in errors), errors  # 2 bits per weight on a random 16-wide model
    assert sorted(root.rglob("samples/step_*.png"))  # the flow-matching sample grid
    card = (root / "packed" / "README.md").read_text()  # its usage names the saved class
    assert 'SD3Transformer2DModel.from_pretrained("<this repo or folder>")' in card and "DiTTransformer2DModel" not in card


def generate(pipe: StableDiffusion3Pipeline, condition: dict, output_type: str = "pt") -> torch.Tensor:
    """``[2, 3, 16, 16]`` images in [0, 1] (or ``[2, 4, 8, 8]`` latents) of two prompts, 3 steps, guidance 4, seed 7."""
    return pipe(prompt_embeds=condition["prompt_embeds"], pooled_prompt_embeds=condition["pooled_prompt_embeds"],
                negative_prompt_embeds=condition["negative_prompt_embeds"].expand(2, -1, -1),
                negative_pooled_prompt_embeds=condition["negative_pooled_prompt_embeds"].expand(2, -1),
                num_inference_steps=3, guidance_scale=4.0, height=16, width=16, output_type=output_type,
                generator=torch.Generator().manual_seed(7)).images


def test_the_packed_transformer_generates_in_the_stock_sd3_pipeline_and_saves_packed(tmp_path, fitted):
    root, embeds = fitted
    condition = prompt_condition(load_prompt_embeds(embeds), torch.tensor([0, 1]))
    fp_pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipeline", **NO_TEXT)
    pipe = StableDiffusion3Pipeline.from_pretrained(root / "pipeline", **NO_TEXT,
                                                    transformer=SD3Transformer2DModel.from_pretrained(root / "packed"))
    fp_latents, latents = generate(fp_pipe, condition, "latent"), generate(pipe, condition, "latent")
    error = float((latents - fp_latents).norm() / fp_latents.norm())
    assert latents.shape == (2, 4, 8, 8) and 0 < error < 0.15, error
    images = generate(pipe, condition)
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())
    torch.testing.assert_close(decode(latents, pipe.vae), images)  # vq4dit decodes as the pipeline (shift factor)
    assert float((images - generate(fp_pipe, condition)).abs().mean()) < float((images[0] - images[1]).abs().mean())
    pipe.save_pretrained(tmp_path / "out")
    assert SD3Transformer2DModel.load_config(tmp_path / "out" / "transformer")["quantization_config"]["quant_method"] == "vq4dit"
    loaded = StableDiffusion3Pipeline.from_pretrained(tmp_path / "out", **NO_TEXT)
    assert len(vq_layers(loaded.transformer)) == 29 and torch.equal(generate(loaded, condition), images)


@pytest.mark.parametrize("source, message", [
    ("--data.prompt_embeds", "plain.safetensors: a SD3 model needs pooled embeddings"),
    ("--data.prompts", "has no tokenizer, text_encoder, tokenizer_2"),  # a folder saved without its text encoders
])
def test_an_sd3_fit_without_pooled_embeddings_is_one_error_line(tmp_path, monkeypatch, capsys, fitted, source, message):
    plain = write_embeddings(tmp_path / "plain.safetensors", embeddings(3, TOKENS, JOINT))
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    given = plain if source == "--data.prompt_embeds" else tmp_path / "prompts.txt"
    args = fit_args(tmp_path, model=["--model.model", str(fitted[0] / "pipeline"), source, str(given), *SMALL])
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err and "encoding" not in err
    (line,) = error_lines(err)
    assert message in line, line
    assert not (tmp_path / "packed").exists()


def test_train_py_predict_samples_the_packed_sd3_with_flow_matching_and_decodes_with_its_vae(tmp_path, fitted):
    root, embeds = fitted
    cli_main(eval_args("predict", tmp_path, "--model.model", str(root / "pipeline"), "--data.prompt_embeds", str(embeds),
                       f"--model.evaluation.quantized={root / 'packed'}", f"--model.evaluation.vae={root / 'pipeline' / 'vae'}"))
    with np.load(tmp_path / "samples.npz") as archive:
        assert archive["arr_0"].shape == (12, 16, 16, 3)  # 12 samples, prompt i mod 3
    assert (tmp_path / "samples" / "labels.txt").read_text().split()[:4] == ["0", "1", "2", "0"]
