"""Model families (issue 21): detection, default layer sets, model calls, hook-recorded block
inputs, and the engine on a tiny random PixArt (CPU, offline)."""

import copy

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from torch import nn

from vq4dit import load_quantized, save_quantized
from vq4dit.engine import CalibrationConfig, Calibrator, block_losses
from vq4dit.engine.allocation import AllocationConfig
from vq4dit.engine.statistics import item_batches
from vq4dit.families import (
    DIT, PIXART, UnsupportedModelError, block_modules, call_model, capture_blocks, conditioning_of, family_of,
)
from vq4dit.models import DEFAULT_QUANTIZED_SUFFIXES, default_linear_filter, load_dit
from vq4dit.quantize import finalize_model_, quantize_, vq_layers
from vq4dit.sampling import NULL_CLASS
from vq4dit.trajectories import ShuffledBatches
from vq4dit.vq_config import VQConfig

PIXART_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                  "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
TOKENS, CAPTION = 5, 12


SIZED = dict(use_additional_conditions=True, attention_head_dim=12, cross_attention_dim=24)  # width divisible by 3


def tiny_pixart(**config) -> PixArtTransformer2DModel:
    """A random 2-block PixArt (16 wide, 8x8 latents of 4 channels, captions of 12 channels);
    ``SIZED``: 24 wide, with the micro-conditions (image size and aspect ratio) of PixArt-α 1024."""
    torch.manual_seed(0)
    base = dict(num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4, out_channels=8,
                sample_size=8, patch_size=2, cross_attention_dim=16, caption_channels=CAPTION,
                norm_type="ada_norm_single", use_additional_conditions=False)
    model = PixArtTransformer2DModel(**{**base, **config}).eval()
    with torch.no_grad():  # diffusers zero-initialises the output head and the block modulation
        for name in ("proj_out.weight", "scale_shift_table"):
            model.get_parameter(name).normal_(0, 0.3)
        for block in model.transformer_blocks:
            block.scale_shift_table.normal_(0, 0.3)
    return model


def text_items(count: int = 16, seed: int = 0, prompts: int = 5) -> dict[str, torch.Tensor]:
    """Calibration items of a text family: per item ``x, t, prompt_index`` into a table of
    ``prompts`` embeddings (masks with padding) held once, like the negative prompt."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(prompts, TOKENS, dtype=torch.long)
    mask[:, 3:] = (torch.rand(prompts, TOKENS - 3, generator=g) < 0.5).long()
    return {
        "x": torch.randn(count, 4, 8, 8, generator=g), "t": torch.randint(0, 1000, (count,), generator=g),
        "prompt_index": torch.arange(count) % prompts,
        "prompt_embeds": torch.randn(prompts, TOKENS, CAPTION, generator=g), "prompt_attention_mask": mask,
        "negative_prompt_embeds": torch.randn(1, TOKENS, CAPTION, generator=g),
        "negative_prompt_attention_mask": torch.tensor([[1, 1, 0, 0, 0]]),
    }


def dit_batch(model, count: int = 2):
    g = torch.Generator().manual_seed(1)
    c = model.config
    return (torch.randn(count, c.in_channels, c.sample_size, c.sample_size, generator=g),
            torch.tensor([10, 700][:count]), torch.tensor([3, NULL_CLASS][:count]))


def test_the_family_is_picked_by_class_and_an_unknown_class_is_one_clear_error():
    assert family_of(load_dit("tiny")) is DIT
    assert family_of(tiny_pixart()) is PIXART
    with pytest.raises(UnsupportedModelError) as error:
        family_of(nn.Linear(2, 2))
    assert isinstance(error.value, TypeError) and isinstance(error.value, ValueError)  # the CLI: one error: line
    assert "Linear" in str(error.value)
    assert "DiTTransformer2DModel" in str(error.value) and "PixArtTransformer2DModel" in str(error.value)
    with pytest.raises(TypeError, match="supported"):
        quantize_(nn.Sequential(nn.Linear(4, 4)), VQConfig(codebook_size=4, subvector_dim=2), progress=False)


def selected_names(model, **options) -> set[str]:
    keep = family_of(model).linear_filter(**options)
    return {name for name, module in model.named_modules() if keep(module, name)}


def test_pixart_quantizes_the_ten_block_linears_and_the_option_adds_adaln():
    model = tiny_pixart()
    blocks = {f"transformer_blocks.{b}.{s}" for b in range(2) for s in PIXART_LINEARS}
    assert selected_names(model) == blocks and len(blocks) == 20
    assert selected_names(model, quantize_adaln=True) == blocks | {"adaln_single.linear"}
    assert selected_names(model, quantize_adaln=False) == blocks
    with_sizes = tiny_pixart(**SIZED)  # its resolution embedders stay FP too
    assert selected_names(with_sizes, quantize_adaln=True) == blocks | {"adaln_single.linear"}
    with pytest.raises(ValueError, match="PixArt models have no layer option 'quantize_ff'; options: quantize_adaln"):
        PIXART.linear_filter(quantize_ff=True)
    with pytest.raises(ValueError, match="DiT models have no layer option 'quantize_adaln'; options: none"):
        DIT.linear_filter(quantize_adaln=True)


def test_the_dit_family_keeps_the_seven_core_linears():
    from vq4dit.models import DEFAULT_QUANTIZED_SUFFIXES, default_linear_filter

    model = load_dit("tiny")
    names = {name for name, module in model.named_modules() if default_linear_filter(module, name)}
    assert selected_names(model) == names == {f"transformer_blocks.{b}.{s}" for b in range(2)
                                              for s in DEFAULT_QUANTIZED_SUFFIXES}
    assert block_modules(model) == list(model.transformer_blocks)


def test_the_pixart_call_is_the_pipelines_call():
    model, items = tiny_pixart(), text_items(4)
    batch = conditioning_of(items).batch(items, torch.arange(4))
    with torch.no_grad():
        direct = model(batch["x"], encoder_hidden_states=batch["prompt_embeds"],
                       encoder_attention_mask=batch["prompt_attention_mask"], timestep=batch["t"],
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
        assert torch.equal(call_model(model, batch), direct)
        sized = tiny_pixart(**SIZED)  # PixArt-α 1024: the image size in pixels
        sizes = {"resolution": torch.tensor([[64.0, 64.0]] * 4), "aspect_ratio": torch.tensor([[1.0]] * 4)}
        expected = sized(batch["x"], encoder_hidden_states=batch["prompt_embeds"],
                         encoder_attention_mask=batch["prompt_attention_mask"], timestep=batch["t"],
                         added_cond_kwargs=sizes).sample
        assert torch.equal(call_model(sized, batch), expected)
        sizes["resolution"] = sizes["resolution"] * 2
        other = sized(batch["x"], encoder_hidden_states=batch["prompt_embeds"],
                      encoder_attention_mask=batch["prompt_attention_mask"], timestep=batch["t"],
                      added_cond_kwargs=sizes).sample
        assert not torch.allclose(other, expected)  # the size really conditions the model


def test_the_unconditional_branch_is_the_negative_prompt_or_the_null_label():
    items = text_items(6)
    doubled = item_batches(items, torch.arange(6), guidance_scale=4.0, batch_size=4)
    assert [b["x"].shape[0] for b in doubled] == [8, 4]
    first = doubled[0]
    assert torch.equal(first["x"][:4], first["x"][4:]) and torch.equal(first["t"][:4], items["t"][:4])
    assert torch.equal(first["prompt_embeds"][:4], items["prompt_embeds"][items["prompt_index"][:4]])
    assert torch.equal(first["prompt_attention_mask"][:4], items["prompt_attention_mask"][[0, 1, 2, 3]])
    assert conditioning_of(first) is conditioning_of(items)  # a batch is known by its keys too
    assert torch.equal(first["prompt_embeds"][4:], items["negative_prompt_embeds"].expand(4, -1, -1))
    assert first["prompt_attention_mask"][4:].tolist() == [[1, 1, 0, 0, 0]] * 4
    plain = item_batches(items, torch.arange(6), guidance_scale=1.0, batch_size=4)
    assert [b["x"].shape[0] for b in plain] == [4, 2]
    dit_items = {"x": torch.zeros(3, 4, 8, 8), "t": torch.arange(3), "y": torch.tensor([1, 2, 3])}
    (x, t, y), = item_batches(dit_items, torch.arange(3), guidance_scale=4.0)
    assert y.tolist() == [1, 2, 3] + [NULL_CLASS] * 3 and x.shape[0] == 6
    shuffled = list(ShuffledBatches(items, 4, seed=0, shuffle=True, epoch_fn=lambda: 0))
    assert sorted(torch.cat([b["t"] for b in shuffled]).tolist()) == sorted(items["t"].tolist())
    assert all(b["negative_prompt_embeds"] is items["negative_prompt_embeds"] for b in shuffled)
    with pytest.raises(ValueError, match="fit no conditioning"):
        conditioning_of({"x": torch.zeros(1), "t": torch.zeros(1), "prompt_embeds": torch.zeros(1)})
    wrong = {**items, "negative_prompt_embeds": torch.zeros(1, TOKENS + 1, CAPTION)}
    with pytest.raises(ValueError, match="negative prompt embeddings"):
        item_batches(wrong, torch.arange(2), guidance_scale=4.0)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_block_inputs_recorded_by_hooks_reproduce_every_block_output(family):
    if family == "dit":
        model, batch = load_dit("tiny"), dit_batch(load_dit("tiny"))
    else:
        items = text_items(3)
        model, batch = tiny_pixart(), PIXART.conditioning.with_unconditional(PIXART.conditioning.batch(items, torch.arange(3)))
    blocks = block_modules(model)
    with torch.no_grad(), capture_blocks(blocks, record_inputs=True) as (outputs, inputs):
        call_model(model, batch)
    assert all(o is not None for o in outputs) and all(i is not None for i in inputs)
    with torch.no_grad():
        for block, (args, kwargs), output in zip(blocks, inputs, outputs):
            assert torch.equal(block(*args, **kwargs), output)
    if family == "pixart":  # the cross-attention inputs are what the block really received
        assert inputs[0][1]["encoder_hidden_states"].shape == (6, TOKENS, 16)  # after the caption projection
        assert inputs[0][1]["encoder_attention_mask"].shape == (6, 1, TOKENS)  # the mask as a bias
    assert not any(block._forward_pre_hooks or block._forward_hooks for block in blocks)  # hooks removed


def test_a_quantized_pixart_runs_the_familys_call_within_vq_error_and_round_trips_packed(tmp_path):
    model, items = tiny_pixart(), text_items(4)
    batch = PIXART.conditioning.with_unconditional(PIXART.conditioning.batch(items, torch.arange(4)))
    with torch.no_grad():
        reference = call_model(model, batch)
    names = quantize_(model, VQConfig(codebook_size=64, subvector_dim=2, num_candidates=1, kmeans_iters=10),
                      progress=False)
    assert set(names) == selected_names(tiny_pixart()) and set(vq_layers(model)) == set(names)
    assert isinstance(model.adaln_single.linear, nn.Linear) and isinstance(model.proj_out, nn.Linear)
    finalize_model_(model)
    with torch.no_grad():
        quantized = call_model(model, batch)
    error = float((quantized - reference).norm() / reference.norm())
    assert 0 < error < 0.05, error  # 3 bits per weight on a random 16-wide model
    save_quantized(model, tmp_path / "packed")  # the packed format and both loaders, unchanged
    for loaded in (load_quantized(tmp_path / "packed"), PixArtTransformer2DModel.from_pretrained(tmp_path / "packed")):
        assert type(loaded) is PixArtTransformer2DModel and set(vq_layers(loaded)) == set(names)
        with torch.no_grad():
            assert torch.equal(call_model(loaded, batch), quantized)


@pytest.mark.parametrize("block_inputs", ["student", "teacher"])
def test_block_losses_of_an_unquantized_copy_are_zero_on_both_families(block_inputs):
    for model, batch in ((load_dit("tiny"), dit_batch(load_dit("tiny"))),
                         (tiny_pixart(), PIXART.conditioning.batch(text_items(2), torch.arange(2)))):
        block_mse, output_mse = block_losses(model, copy.deepcopy(model), batch, block_inputs=block_inputs)
        assert block_mse.shape == (2,) and torch.equal(block_mse, torch.zeros(2))
        assert output_mse.isnan() if block_inputs == "teacher" else output_mse == 0


def test_the_engine_calibrates_a_pixart_with_every_lever_and_bit_allocation():
    """Statistics, error feedback, the allocation probe and its check, guided block losses, pruning:
    the engine runs a PixArt with no PixArt-specific code, and the student gets closer to the teacher."""
    teacher, items = tiny_pixart(), text_items(32)
    config = VQConfig(codebook_size=16, subvector_dim=2, num_candidates=2, row_scale=True,
                      kmeans_metric="activation", error_feedback=True, ratio_init="confident")
    engine = Calibrator.build(teacher, config, CalibrationConfig(), guidance_scale=4.0, items=items, progress=False,
                              bit_allocation=True, allocation_config=AllocationConfig(gain_items=8, check_items=8))
    assert set(engine.layers) == selected_names(teacher) and engine.allocation_check is not None
    batches = list(ShuffledBatches(items, 8, seed=0, shuffle=False, epoch_fn=lambda: 0))
    start, optimizer = engine.snapshot(), engine.make_optimizer()
    for step in range(40):
        engine.step_loss(batches[step % len(batches)], step).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        engine.prune_(optimizer)
    engine.finalize_()

    def error() -> float:  # block MSE of the hard student
        with torch.no_grad():
            return sum(float(engine.block_losses(b)[0].mean()) for b in batches)

    calibrated = error()
    engine.restore_(start)  # the hard (argmax) start
    assert calibrated < 0.9 * error()  # measured: 0.77


def test_the_layer_options_reach_the_student_and_a_wrong_one_is_one_error_line(tmp_path, monkeypatch, capsys):
    from tests.test_calibration import fit_args
    from tests.test_trust import error_lines, run_main
    from vq4dit.engine.config import LayerSelection

    teacher, config = tiny_pixart(), VQConfig(codebook_size=16, subvector_dim=2)
    layers = LayerSelection(options={"quantize_adaln": True})
    engine = Calibrator.build(teacher, config, progress=False, filter_fn=layers.linear_filter(teacher))
    assert set(engine.layers) == selected_names(teacher, quantize_adaln=True)
    assert LayerSelection().linear_filter(teacher) is None  # no options: the family's own default
    with pytest.raises(ValueError, match="with layers.include they do nothing"):
        LayerSelection(include=["*"], options={"quantize_adaln": True}).linear_filter(teacher)
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, "--model.layers.options={quantize_adaln: true}"))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert "DiT models have no layer option 'quantize_adaln'" in line


# ---------------------------------------------------------------------------------------------
# DiT: the default quantized set and the blocks (vq4dit.models' names)
# ---------------------------------------------------------------------------------------------


def test_default_linear_filter_selects_seven_core_linears_per_block():
    model = load_dit("tiny")
    selected = {name for name, m in model.named_modules() if default_linear_filter(m, name)}
    expected = {f"transformer_blocks.{i}.{s}" for i in range(2) for s in DEFAULT_QUANTIZED_SUFFIXES}
    assert selected == expected and len(selected) == 7 * 2
    assert not any("norm1.emb" in name for name in selected)
    assert not default_linear_filter(nn.Identity(), "transformer_blocks.0.attn1.to_q")
    assert not default_linear_filter(nn.Linear(2, 2), "model.transformer_blocks.0.attn1.to_q")
    assert not default_linear_filter(nn.Linear(2, 2), "proj_out_1")


def test_block_modules_in_order():
    model = load_dit("tiny")
    blocks = block_modules(model)
    assert len(blocks) == 2
    assert all(a is b for a, b in zip(blocks, model.transformer_blocks))
    with pytest.raises(TypeError):
        block_modules(nn.Linear(2, 2))


def test_reference_source_loads_the_shipped_digits_dit():
    model = load_dit("reference")
    assert not model.training
    assert model.config.in_channels == 1 and model.config.out_channels == 2
    assert model.config.sample_size == 16 and model.config.num_embeds_ada_norm == 1000
    x = torch.randn(2, 1, 16, 16)
    out = model(x, timestep=torch.tensor([10, 900]), class_labels=torch.tensor([3, 1000])).sample
    assert out.shape == (2, 2, 16, 16) and torch.isfinite(out).all()
