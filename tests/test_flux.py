"""Flux (issue 22): the FLUX.1 family on tiny random ``FluxTransformer2DModel`` s (1 double + 1 single
block, 16 wide, 8x8 latents of 4 channels packed into 16 tokens of 16): default layer sets, the
pipeline's call (packing, RoPE ids, sigma timestep, embedded guidance), block losses over both
kinds of blocks, the 3-key prompt file, trajectories against the stock ``FluxPipeline`` (dev and
schnell), ``train.py fit`` end to end with the packed transformer in the stock pipeline (CPU, offline)."""

import copy

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from torch import nn

from tests.test_calibration import fit_args
from tests.test_mmdit import relative_error, sd3_embeddings, tiny_sd3
from tests.test_mmdit import tiny_vae as sd3_vae
from tests.test_prompts import write_embeddings
from tests.test_trust import error_lines, run_main
from train import cli_main
from vq4dit import load_quantized
from vq4dit.engine import block_losses
from vq4dit.evaluation import decode
from vq4dit.families import FLUX, DistilledTextPrompts, call_model, capture_blocks, conditioning_of, family_of
from vq4dit.families.flux import pack, unpack
from vq4dit.families.guidance import sample_conditioned
from vq4dit.flow_matching import dynamic_flow_schedule, image_seq_shift
from vq4dit.prompts import check_prompts_fit, load_prompt_embeds, prompt_condition
from vq4dit.quantize import vq_layers
from vq4dit.sampling import SamplerConfig, initial_noise
from vq4dit.trajectories import TrajectoryPlan, cached_items

TOKENS, JOINT, POOLED, SIDE = 5, 12, 10, 8  # T5-like context, pooled CLIP, latent side (16 tokens of 2x2)


def tiny_flux(guidance_embeds: bool = True, double: int = 1, single: int = 1) -> FluxTransformer2DModel:
    """A random FLUX.1 (dev: ``guidance_embeds``; schnell: not) with ``double`` double and ``single``
    single blocks, 2 heads of 8, ``in_channels`` 16 (4 latent channels x 2 x 2) and ``sample_size`` 8."""
    torch.manual_seed(0)
    model = FluxTransformer2DModel(in_channels=16, num_layers=double, num_single_layers=single, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=JOINT, pooled_projection_dim=POOLED,
                                   guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4)).eval()
    model.register_to_config(sample_size=SIDE)  # diffusers keeps (and saves) it; the family reads it
    return model


def flux_embeddings(count: int = 3, seed: int = 0) -> dict[str, torch.Tensor]:
    """A valid Flux prompt-embeddings dict: ``prompt_embeds``, ones as the mask, ``pooled_prompt_embeds``."""
    g = torch.Generator().manual_seed(seed)
    return {"prompt_embeds": torch.randn(count, TOKENS, JOINT, generator=g),
            "prompt_attention_mask": torch.ones(count, TOKENS, dtype=torch.long),
            "pooled_prompt_embeds": torch.randn(count, POOLED, generator=g)}


def flux_batch(count: int = 2, seed: int = 3, guidance: float = 3.5) -> dict[str, torch.Tensor]:
    """``count`` model-batch items (x, float t = 1000 sigma, prompts 0..count-1, guidance)."""
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(count, 4, SIDE, SIDE, generator=g), "t": torch.linspace(900.0, 100.0, count),
            **prompt_condition(flux_embeddings(count), torch.arange(count)), "guidance": torch.full((count,), guidance)}


def test_the_default_set_is_every_block_linear_with_the_modulation_and_the_option_keeps_it_fp():
    model = tiny_flux()
    assert family_of(model) is FLUX
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    chosen = {name for name, module in model.named_modules() if FLUX.linear_filter()(module, name)}
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
              "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
              "ff_context.net.2", "norm1.linear", "norm1_context.linear"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out", "norm.linear"]
    assert chosen == {f"transformer_blocks.0.{n}" for n in double} | {f"single_transformer_blocks.0.{n}" for n in single}
    assert linears - chosen == {"context_embedder", "x_embedder", "norm_out.linear", "proj_out",
                                *(f"time_text_embed.{e}.linear_{i}" for e in ("timestep_embedder", "guidance_embedder",
                                                                              "text_embedder") for i in (1, 2))}
    fp = {name for name, module in model.named_modules() if FLUX.linear_filter(quantize_modulation=False)(module, name)}
    assert chosen - fp == {"transformer_blocks.0.norm1.linear", "transformer_blocks.0.norm1_context.linear",
                           "single_transformer_blocks.0.norm.linear"}
    assert [type(b).__name__ for b in FLUX.blocks(model)] == ["FluxTransformerBlock", "FluxSingleTransformerBlock"]
    with pytest.raises(ValueError, match="Flux models have no layer option 'quantize_adaln'; options: quantize_modulation"):
        FLUX.linear_filter(quantize_adaln=True)


NO_TEXT = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))  # embeddings in
DEV_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                     max_image_seq_len=4096)  # FLUX.1-dev's scheduler_config.json; schnell's: shift 1, static


def stock_pipeline(transformer: nn.Module, vae: AutoencoderKL | None = None) -> FluxPipeline:
    """``FluxPipeline`` on ``transformer`` with the FLUX.1 scheduler of its kind, no text encoders."""
    dev = transformer.config.guidance_embeds
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER) if dev else FlowMatchEulerDiscreteScheduler(shift=1.0)
    return FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, **NO_TEXT)


def pipeline_run(transformer: nn.Module, condition: dict, latents: torch.Tensor | None, steps: int, guidance: float,
                 side: int = SIDE, **extra):
    """The pipeline's output (packed latents unless ``output_type`` says otherwise), the packed
    latents of every step's input and the transformer's keyword arguments of every call."""
    seen, calls, times = [] if latents is None else [latents.clone()], [], []

    def keep(_pipe, _i, t, kwargs):
        seen.append(kwargs["latents"].clone())
        times.append(t)
        return {}

    hook = transformer.register_forward_pre_hook(lambda _m, _a, kwargs: calls.append(kwargs), with_kwargs=True)
    try:  # vae None: vae_scale_factor 8, so 8 px per latent
        out = stock_pipeline(transformer)(
            prompt_embeds=condition["prompt_embeds"], pooled_prompt_embeds=condition["pooled_prompt_embeds"],
            latents=latents, num_inference_steps=steps, guidance_scale=guidance, height=8 * side, width=8 * side,
            output_type="latent", callback_on_step_end=keep, **extra).images
    finally:
        hook.remove()
    return out, seen[:-1], calls, times


@pytest.mark.parametrize("dev", [True, False])
def test_the_family_calls_the_model_as_the_flux_pipeline_does(dev):
    model, batch = tiny_flux(dev), flux_batch(guidance=2.5)
    latents = pack(batch["x"])
    assert torch.equal(unpack(latents, SIDE, SIDE), batch["x"]) and latents.shape == (2, 16, 16)
    _, _, calls, times = pipeline_run(model, batch, latents, 1, 2.5)
    (given,), batch = calls, {**batch, "t": times[0].expand(2)}  # the scheduler's timestep (1000 sigma)
    args, kwargs = FLUX.inputs(model, batch)
    assert args == () and set(kwargs) <= set(given)
    for key, value in kwargs.items():
        assert (value is None and given[key] is None) if value is None or given[key] is None \
            else torch.equal(value, given[key]), key
    assert (kwargs["guidance"] is None) != dev and "image_rotary_emb" not in kwargs
    with torch.no_grad():
        out = call_model(model, batch)
        stock = model(**given)[0]  # the pipeline asks for return_dict=False
    assert out.shape == (2, 4, SIDE, SIDE) and torch.equal(out, unpack(stock, SIDE, SIDE))
    with torch.no_grad():  # the embedded guidance matters to dev only; the pooled prompt to both
        other = call_model(model, {**batch, "guidance": batch["guidance"] + 3})
        pooled = call_model(model, {**batch, "pooled_prompt_embeds": batch["pooled_prompt_embeds"] + 1})
    assert torch.equal(other, call_model(model, batch)) != dev and not torch.allclose(pooled, call_model(model, batch))
    if dev:
        with pytest.raises(ValueError, match="needs the guidance scale"):
            call_model(model, {k: v for k, v in batch.items() if k != "guidance"})


def test_the_batches_carry_the_guidance_scale_and_no_unconditional_branch():
    items = {"x": torch.randn(3, 4, SIDE, SIDE), "t": torch.ones(3), "prompt_index": torch.tensor([2, 0, 1]),
             **flux_embeddings()}
    conditioning = conditioning_of(items)
    assert isinstance(conditioning, DistilledTextPrompts)
    batch = conditioning.batch(items, torch.tensor([0, 1]))
    assert torch.equal(batch["pooled_prompt_embeds"], items["pooled_prompt_embeds"][[2, 0]])
    guided = FLUX.conditioning.guided(batch, 1.0)  # guidance 1 is still an input; never a 2B batch
    assert guided["x"].shape[0] == 2 and torch.equal(guided["guidance"], torch.ones(2))
    assert torch.equal(FLUX.conditioning.guided(batch, 4.0)["guidance"], torch.full((2,), 4.0))
    with pytest.raises(ValueError, match="no unconditional branch"):
        FLUX.conditioning.with_unconditional(batch)


def test_block_losses_cover_both_streams_of_double_blocks_and_the_single_blocks_with_their_rope_kwargs():
    teacher, batch = tiny_flux(), flux_batch()
    with torch.no_grad(), capture_blocks(FLUX.blocks(teacher), record_inputs=True) as (_, inputs):
        call_model(teacher, batch)
    for _, kwargs in inputs:  # the hooks keep the blocks' keyword inputs: RoPE and the time embedding
        cos, sin = kwargs["image_rotary_emb"]
        assert cos.shape == sin.shape == (TOKENS + 16, 8) and kwargs["temb"].shape == (2, 16)
    for block, stream in ((0, "ff_context.net.2"), (0, "ff.net.2"), (1, "proj_out")):
        student = copy.deepcopy(teacher)
        with torch.no_grad():
            FLUX.blocks(student)[block].get_submodule(stream).weight.add_(0.05)
        for mode in ("student", "teacher"):
            block_mse, _ = block_losses(teacher, student, batch, block_inputs=mode)
            assert block_mse[block] > 0 and torch.isfinite(block_mse).all(), (stream, mode)
            if block == 0:
                assert (block_mse[1] > 0) == (mode == "student")  # teacher inputs: block 1 sees the true input
            else:
                assert block_mse[0] == 0
    same, _ = block_losses(teacher, copy.deepcopy(teacher), batch)
    assert torch.equal(same, torch.zeros(2))


def test_flux_prompt_files_have_no_negative_keys_and_a_mismatch_is_one_error_naming_the_file(tmp_path):
    path = write_embeddings(tmp_path / "f.safetensors", flux_embeddings())
    prompts = load_prompt_embeds(path)
    assert set(prompts) == {"prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"}
    check_prompts_fit(tiny_flux(), prompts, str(path))
    sd3_file = load_prompt_embeds(write_embeddings(tmp_path / "s.safetensors", sd3_embeddings()))
    for model, given, message in (
        (tiny_flux(), sd3_file, "a Flux model is guidance-distilled, with no unconditional branch"),
        (tiny_sd3(), prompts, "a SD3 model needs the negative prompt of its unconditional branch"),
    ):
        with pytest.raises(ValueError, match=message) as raised:
            check_prompts_fit(model, given, "x.safetensors")
        assert "x.safetensors" in str(raised.value) and "\n" not in str(raised.value)
    for changes, message in (({"pooled_prompt_embeds": torch.randn(2, POOLED)}, "do not match 3 prompts"),
                             ({"pooled_prompt_embeds": None}, "Flux: prompt_embeds, prompt_attention_mask, pooled_prompt_embeds"),
                             ({"prompt_attention_mask": None}, "lacks prompt_attention_mask")):
        bad = write_embeddings(tmp_path / "bad.safetensors", flux_embeddings(), **changes)
        with pytest.raises(ValueError, match="prompt embeddings .*bad.safetensors") as raised:
            load_prompt_embeds(bad)
        assert message in str(raised.value) and "\n" not in str(raised.value)


# --- trajectories ----------------------------------------------------------------------------------

@pytest.mark.parametrize("steps, tokens, dev", [(4, 16, True), (28, 4096, True), (3, 1024, False)])
def test_the_flux_schedule_is_the_pipelines_shifted_by_the_image_token_count(steps, tokens, dev):
    scheduler = FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER) if dev else FlowMatchEulerDiscreteScheduler(shift=1.0)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=image_seq_shift(tokens))  # FluxPipeline's
    ours, timesteps = dynamic_flow_schedule(steps, image_seq_shift(tokens) if dev else None)
    assert torch.equal(ours, scheduler.sigmas) and torch.equal(timesteps, scheduler.timesteps)
    assert image_seq_shift(256) == pytest.approx(0.5) and image_seq_shift(4096) == pytest.approx(1.15)


@pytest.mark.parametrize("dev", [True, False])
def test_the_teachers_trajectories_are_the_flux_pipelines_latents_at_every_step(tmp_path, dev):
    teacher = tiny_flux(dev)
    prompts = load_prompt_embeds(write_embeddings(tmp_path / "p.safetensors", flux_embeddings()))
    plan = TrajectoryPlan(0, 2, 3, SamplerConfig(num_steps=4, guidance_scale=3.5), prompts_digest="a" * 64)
    items = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert items["x"].shape == (16, 4, SIDE, SIDE) and items["prompt_index"][:4].tolist() == [0, 1, 2, 0]
    assert set(items) == {"x", "t", "prompt_index", "prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds"}
    seeds = plan.labels_and_seeds(0)[1] + plan.labels_and_seeds(1)[1]
    condition = prompt_condition(prompts, torch.tensor([0, 1, 2, 0]))
    noise = initial_noise((4, SIDE, SIDE), seeds, "cpu")
    final, seen, calls, times = pipeline_run(teacher, condition, pack(noise), 4, 3.5)
    assert torch.equal(items["t"][::4], torch.stack(times))  # 1000 sigma, noisiest first
    assert all((c["guidance"] is None) != dev for c in calls)
    ours, trajectory = sample_conditioned(FLUX, teacher, condition, seeds, plan.sampler, record_trajectory=True)
    torch.testing.assert_close(pack(ours), final, rtol=1e-4, atol=1e-5)
    unpacked = torch.cat([unpack(x, SIDE, SIDE) for x in seen])
    torch.testing.assert_close(torch.cat([x for x, _ in trajectory]), unpacked, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(items["x"], unpacked, rtol=1e-4, atol=1e-5)  # the items are those x_t
    again = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert all(torch.equal(again[key], items[key]) for key in items)


# --- train.py fit end to end, the packed transformer in the stock pipeline ------------------------

SMALL = ["--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_trajectories=2",
         "--data.classes_per_trajectory=2", "--data.num_steps=6", "--trainer.max_epochs=3", "--data.guidance_scale=3.5"]
FP_MODULATION = '--model.layers.options={"quantize_modulation": false}'


def tiny_vae() -> AutoencoderKL:
    """test_mmdit's tiny VAE (8x8x4 latents of 16x16 images) with FLUX.1's scaling and shift factors."""
    vae = sd3_vae()
    vae.register_to_config(scaling_factor=0.3611, shift_factor=0.1159)
    return vae


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny FLUX.1-dev pipeline folder (no text encoders), its prompts, and ``train.py fit`` of it
    twice: ``packed`` (modulation quantized, the default) and ``fp_modulation/packed``."""
    root = tmp_path_factory.mktemp("flux")
    stock_pipeline(tiny_flux(), tiny_vae()).save_pretrained(root / "pipeline")
    embeds = write_embeddings(root / "e.safetensors", flux_embeddings())
    for out, extra in ((root, []), (root / "fp_modulation", [FP_MODULATION])):
        cli_main(fit_args(out, *extra, model=["--model.model", str(root / "pipeline"), "--data.prompt_embeds",
                                              str(embeds), *SMALL]))
    return root, embeds


def test_fit_calibrates_a_flux_folder_and_stock_from_pretrained_loads_the_packed_transformer(fitted):
    root, _ = fitted
    fp = FluxTransformer2DModel.from_pretrained(root / "pipeline" / "transformer")
    packed = FluxTransformer2DModel.from_pretrained(root / "packed")  # stock diffusers, vq4dit's backend
    fp_modulation = FluxTransformer2DModel.from_pretrained(root / "fp_modulation" / "packed")
    assert len(vq_layers(packed)) == 20 and len(vq_layers(fp_modulation)) == 17  # 3 modulation Linears FP
    assert not any("norm" in name for name in vq_layers(fp_modulation))
    batch = flux_batch(3, seed=11)
    with torch.no_grad():
        assert torch.equal(call_model(load_quantized(root / "packed"), batch), call_model(packed, batch))
    errors = [relative_error(model, fp, batch) for model in (packed, fp_modulation)]
    print(f"relative output error after fit: modulation quantized {errors[0]:.4f}, FP {errors[1]:.4f}")
    assert all(0 < error < 0.1 for error in errors), errors  # 2 bits per weight on a random 16-wide model
    assert sorted(root.rglob("samples/step_*.png"))  # the flow-matching sample grid
    card = (root / "packed" / "README.md").read_text()
    assert 'FluxTransformer2DModel.from_pretrained("<this repo or folder>")' in card


def generate(pipe: FluxPipeline, condition: dict, output_type: str = "pt") -> torch.Tensor:
    """``[2, 3, 16, 16]`` images in [0, 1] (or packed latents) of two prompts, 3 steps, guidance 3.5, seed 7."""
    return pipe(prompt_embeds=condition["prompt_embeds"], pooled_prompt_embeds=condition["pooled_prompt_embeds"],
                num_inference_steps=3, guidance_scale=3.5, height=16, width=16, output_type=output_type,
                generator=torch.Generator().manual_seed(7)).images


def test_the_packed_transformer_generates_in_the_stock_flux_pipeline_and_saves_packed(tmp_path, fitted):
    root, embeds = fitted
    condition = prompt_condition(load_prompt_embeds(embeds), torch.tensor([0, 1]))
    fp_pipe = FluxPipeline.from_pretrained(root / "pipeline", **NO_TEXT)
    pipe = FluxPipeline.from_pretrained(root / "pipeline", **NO_TEXT,
                                        transformer=FluxTransformer2DModel.from_pretrained(root / "packed"))
    fp_latents, latents = generate(fp_pipe, condition, "latent"), generate(pipe, condition, "latent")
    error = float((latents - fp_latents).norm() / fp_latents.norm())
    assert latents.shape == (2, 16, 16) and 0 < error < 0.15, error  # packed: 16 tokens of 2x2x4
    images = generate(pipe, condition)
    assert images.shape == (2, 3, 16, 16) and bool(torch.isfinite(images).all())
    torch.testing.assert_close(decode(unpack(latents, SIDE, SIDE), pipe.vae), images)  # vq4dit decodes as the pipeline
    assert float((images - generate(fp_pipe, condition)).abs().mean()) < float((images[0] - images[1]).abs().mean())
    pipe.save_pretrained(tmp_path / "out")
    assert FluxTransformer2DModel.load_config(tmp_path / "out" / "transformer")["quantization_config"]["quant_method"] == "vq4dit"
    loaded = FluxPipeline.from_pretrained(tmp_path / "out", **NO_TEXT)
    assert len(vq_layers(loaded.transformer)) == 20 and torch.equal(generate(loaded, condition), images)


def test_a_flux_fit_with_negative_prompt_keys_is_one_error_line(tmp_path, monkeypatch, capsys, fitted):
    with_negatives = {**flux_embeddings(), "negative_prompt_embeds": torch.randn(1, TOKENS, JOINT),
                      "negative_prompt_attention_mask": torch.ones(1, TOKENS, dtype=torch.long),
                      "negative_pooled_prompt_embeds": torch.randn(1, POOLED)}
    given = write_embeddings(tmp_path / "sd3_style.safetensors", with_negatives)
    args = fit_args(tmp_path, model=["--model.model", str(fitted[0] / "pipeline"), "--data.prompt_embeds", str(given),
                                     *SMALL])
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert "sd3_style.safetensors: a Flux model is guidance-distilled" in line, line
    assert not (tmp_path / "packed").exists()
