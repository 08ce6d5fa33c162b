"""``train.py fit`` on a text-conditioned model (issue 21): a PixArt-architecture folder plus a
prompt-embeddings file calibrates, exports a packed ``PixArtTransformer2DModel``, and every bad
embeddings file or mismatch is one ``error:`` line before any work (CPU, offline)."""

import pytest
import torch
from diffusers import PixArtTransformer2DModel

from tests.test_calibration import fit_args
from tests.test_families import CAPTION, TOKENS, tiny_pixart
from tests.test_prompts import embeddings, write_embeddings
from tests.test_trust import error_lines, run_main
from train import cli_main
from vq4dit import load_quantized
from vq4dit.families import PIXART, call_model
from vq4dit.families.guidance import sample_conditioned
from vq4dit.models import load_dit
from vq4dit.prompts import load_prompt_embeds, prompt_condition
from vq4dit.quantize import vq_layers
from vq4dit.sampling import SamplerConfig
from vq4dit.trajectories import TrajectoryPlan, cached_items

SMALL = ["--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_trajectories=2",
         "--data.classes_per_trajectory=2", "--data.num_steps=6"]


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    """A tiny random PixArt saved as a pipeline folder (``transformer/``) and its FP model."""
    folder, model = tmp_path_factory.mktemp("pipe"), tiny_pixart()
    model.save_pretrained(folder / "transformer")
    return folder, model


def text_args(tmp_path, folder, embeds, *extra):
    return fit_args(tmp_path, *extra, model=["--model.model", str(folder), "--data.prompt_embeds", str(embeds), *SMALL])


def test_a_pixart_folder_loads_as_pixart_and_dit_loading_is_unchanged(pixart_folder):
    folder, model = pixart_folder
    for source in (folder, folder / "transformer"):
        loaded = load_dit(source)
        assert type(loaded) is PixArtTransformer2DModel and not loaded.training
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    assert type(load_dit("tiny")).__name__ == "DiTTransformer2DModel"


def test_text_trajectories_cycle_the_prompts_guided_by_the_negative_one_and_cache_on_the_file(tmp_path, pixart_folder):
    _, teacher = pixart_folder
    prompts = load_prompt_embeds(write_embeddings(tmp_path / "e.safetensors"))  # 3 prompts
    plan = TrajectoryPlan(0, 2, 3, SamplerConfig(num_steps=4, guidance_scale=4.0), prompts_digest="a" * 64)
    items = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert items["x"].shape == (16, 4, 8, 8) and items["prompt_embeds"] is prompts["prompt_embeds"]
    assert items["prompt_index"][:4].tolist() == [0, 1, 2, 0]  # N prompts cycled over the trajectories
    assert "y" not in items and items["t"][::4].tolist() == [999, 666, 333, 0]
    # the items are the teacher's trajectory guided against the negative prompt
    seeds = plan.labels_and_seeds(0)[1] + plan.labels_and_seeds(1)[1]
    condition = prompt_condition(prompts, torch.tensor([0, 1, 2, 0]))
    _, trajectory = sample_conditioned(PIXART, teacher, condition, seeds, plan.sampler, record_trajectory=True)
    assert torch.equal(torch.cat([x for x, _ in trajectory]), items["x"])
    unguided = sample_conditioned(PIXART, teacher, condition, seeds, SamplerConfig(num_steps=4, guidance_scale=1.0),
                                  record_trajectory=True)[1]
    assert not torch.allclose(unguided[-1][0], trajectory[-1][0])  # guidance really changes the trajectory
    files = sorted((tmp_path / "cache").iterdir())
    again = cached_items(teacher, [0, 1], plan, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert all(torch.equal(again[k], items[k]) for k in items) and sorted((tmp_path / "cache").iterdir()) == files
    other = TrajectoryPlan(0, 2, 3, plan.sampler, prompts_digest="b" * 64)  # another embeddings file
    cached_items(teacher, [0, 1], other, str(tmp_path / "cache"), progress=False, prompts=prompts)
    assert len(list((tmp_path / "cache").iterdir())) == len(files) + 1


def test_fit_calibrates_a_pixart_folder_from_an_embeddings_file_and_exports_a_pixart(tmp_path, pixart_folder):
    folder, teacher = pixart_folder
    embeds = write_embeddings(tmp_path / "e.safetensors")
    cli = cli_main(text_args(tmp_path, folder, embeds, "--trainer.max_epochs=3"))
    module = cli.model
    assert module.engine.layers and set(module.engine.layers) == set(vq_layers(module.student))
    train_items = cli.datamodule.train_items
    assert set(train_items["prompt_index"].tolist()) == {0, 1, 2} and train_items["prompt_embeds"].shape[0] == 3
    packed = load_quantized(tmp_path / "packed")
    assert type(packed) is PixArtTransformer2DModel and len(vq_layers(packed)) == 20  # 10 per block
    prompts = load_prompt_embeds(embeds)
    g = torch.Generator().manual_seed(5)
    batch = {"x": torch.randn(3, 4, 8, 8, generator=g), "t": torch.tensor([10, 500, 990]),
             **prompt_condition(prompts, torch.arange(3))}
    with torch.no_grad():
        fp, quantized = call_model(teacher, batch), call_model(packed, batch)
        same = packed(batch["x"], encoder_hidden_states=batch["prompt_embeds"],  # the pipelines' call
                      encoder_attention_mask=batch["prompt_attention_mask"], timestep=batch["t"],
                      added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    assert torch.equal(same, quantized)
    error = float((quantized - fp).norm() / fp.norm())
    assert 0 < error < 0.1, error  # 2 bits per weight (k=16, d=2) on a random 16-wide model
    assert sorted(tmp_path.rglob("samples/step_*.png"))  # the sample grid shows the prompts


CHANNELS_WRONG = embeddings(channels=CAPTION + 4)


@pytest.mark.parametrize("case, make, message", [
    ("keys", lambda p: write_embeddings(p, pooled=torch.zeros(1)), "has extra pooled"),
    ("tokens", lambda p: write_embeddings(p, negative_prompt_attention_mask=torch.ones(1, TOKENS + 2, dtype=torch.long)),
     "do not match prompt_embeds"),
    ("channels", lambda p: write_embeddings(p, CHANNELS_WRONG), "caption_channels is 12"),
    ("missing", lambda p: p, "do not exist"),
])
def test_a_bad_embeddings_file_is_one_error_line_before_any_work(tmp_path, monkeypatch, capsys, pixart_folder, case, make,
                                                                 message):
    embeds = make(tmp_path / "e.safetensors")
    code, err = run_main(monkeypatch, capsys, text_args(tmp_path, pixart_folder[0], embeds))
    assert code == 2 and "Traceback" not in err and "teacher trajectories" not in err
    (line,) = error_lines(err)
    assert message in line, line
    assert not (tmp_path / "packed").exists()


def test_text_and_class_models_refuse_the_other_conditioning_in_one_error_line(tmp_path, monkeypatch, capsys, pixart_folder):
    embeds = write_embeddings(tmp_path / "e.safetensors")
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, f"--data.prompt_embeds={embeds}"))
    assert code == 2 and "Traceback" not in err
    assert "conditioned on class labels, not text" in error_lines(err)[0]
    code, err = run_main(monkeypatch, capsys, fit_args(tmp_path, model=["--model.model", str(pixart_folder[0]), *SMALL]))
    assert code == 2 and "Traceback" not in err
    assert "text-conditioned: give its calibration prompts with --data.prompt_embeds" in error_lines(err)[0]


def test_a_prompt_source_given_as_a_flag_replaces_the_one_a_config_names():
    from train import prompts_from_command_line

    config = ["fit", "--config", "c.yaml"]
    assert prompts_from_command_line([*config, "--data.prompt_embeds", "e.safetensors"])[-1] == "--data.prompts=null"
    assert prompts_from_command_line([*config, "--data.prompts=p.txt"])[-1] == "--data.prompt_embeds=null"
    both = [*config, "--data.prompts=p.txt", "--data.prompt_embeds=e.safetensors"]
    assert prompts_from_command_line(both) == both and prompts_from_command_line(config) == config
