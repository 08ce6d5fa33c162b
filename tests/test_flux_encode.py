"""Flux's text path end to end with real Hugging Face components: a tiny random ``FluxPipeline``
folder (a ``CLIPTextModel`` as CLIP-L, a T5, fast tokenizers built offline with ``tokenizers``, a
1+1-block FLUX.1-dev transformer, a VAE with FLUX.1's factors), ``python -m vq4dit.prompts encode``
on it against the pipeline's own ``encode_prompt``, ``train.py fit --data.prompts`` calibrating from
it, and a negative prompt refused as one ``error:`` line (CPU, offline, ~10 s)."""

import pytest
import torch

pytest.importorskip("transformers", minversion="5")  # the `text` / `test` extras

from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel

from tests.test_calibration import fit_args
from tests.test_flux import DEV_SCHEDULER, JOINT, POOLED, SMALL, tiny_flux, tiny_vae
from tests.test_sd3_pipeline import CLIP_LENGTH, clip_tokenizer
from tests.test_text_pipeline import WORDS, tiny_t5, tiny_tokenizer
from tests.test_trust import error_lines, run_main
from train import cli_main
from vq4dit.prompts import DISTILLED_KEYS, check_encodable, check_prompts_fit, load_prompt_embeds
from vq4dit.prompts.__main__ import main as prompts_main
from vq4dit.prompts.encode import pipeline_class
from vq4dit.quantize import vq_layers

PROMPTS = ["a red circle", "a blue square on the left", "The red square on the right"]  # "The": <unk>, as written


def tiny_clip_l() -> CLIPTextModel:
    """A random 2-layer ``CLIPTextModel`` ``POOLED`` wide (its ``pooler_output``: the pooled embedding)."""
    config = CLIPTextConfig(vocab_size=3 + len(WORDS), hidden_size=POOLED, intermediate_size=2 * POOLED,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModel(config).eval()


def tiny_flux_pipeline() -> FluxPipeline:
    """A random FLUX.1-dev-style pipeline: CLIP-L, T5 (``JOINT`` wide), 1+1-block transformer, VAE."""
    torch.manual_seed(0)
    transformer, clip, t5 = tiny_flux(), tiny_clip_l(), tiny_t5(JOINT)
    return FluxPipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(**DEV_SCHEDULER),
                        vae=tiny_vae(), text_encoder=clip, tokenizer=clip_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=tiny_tokenizer())


def encode(root, out, *extra: str) -> int:
    """``python -m vq4dit.prompts encode`` of ``root``'s pipeline and prompts into ``out``: its exit status."""
    return prompts_main(["encode", "--pipeline", str(root / "pipeline"), "--prompts", str(root / "prompts.txt"),
                         "--out", str(out), *extra])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The pipeline folder, the prompt file, and the encode command's output ``e.safetensors``."""
    root = tmp_path_factory.mktemp("flux_text")
    tiny_flux_pipeline().save_pretrained(root / "pipeline")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert encode(root, root / "e.safetensors") == 0
    return root


def assert_file_is(path, pipe: FluxPipeline, **options) -> dict[str, torch.Tensor]:
    """The file at ``path`` is ``pipe.encode_prompt(PROMPTS, **options)``'s embeddings and pooled
    embeddings (within 1e-4) with an all-ones mask, and nothing else."""
    embeds, pooled, text_ids = pipe.encode_prompt(PROMPTS, None, **options)
    prompts = load_prompt_embeds(path)
    assert set(prompts) == set(DISTILLED_KEYS)
    for key, tensor in (("prompt_embeds", embeds), ("pooled_prompt_embeds", pooled)):
        assert prompts[key].shape == tensor.shape, key
        # float32 either way; the kernels may differ by batch layout (2e-5 seen on one of 18,432 values, AMD EPYC):
        # any other encoder or key is off by O(1)
        torch.testing.assert_close(prompts[key], tensor.float(), rtol=1e-4, atol=1e-4, msg=key)
    mask = prompts["prompt_attention_mask"]
    assert mask.shape == embeds.shape[:2] and bool((mask == 1).all()) and text_ids.shape == (embeds.shape[1], 3)
    return prompts


def test_the_encode_command_writes_what_the_flux_pipelines_encode_prompt_returns(folder, tmp_path):
    pipe = FluxPipeline.from_pretrained(folder / "pipeline")
    prompts = assert_file_is(folder / "e.safetensors", pipe)  # max_sequence_length: the pipeline's 512
    assert prompts["prompt_embeds"].shape == (3, 512, JOINT) and prompts["pooled_prompt_embeds"].shape == (3, POOLED)
    embeds, pooled = prompts["prompt_embeds"], prompts["pooled_prompt_embeds"]
    assert not torch.allclose(embeds[0], embeds[1]) and not torch.allclose(pooled[0], pooled[1])
    check_prompts_fit(pipe.transformer, prompts, "e.safetensors")
    check_encodable(pipe.transformer)  # --data.prompts no longer refuses Flux
    lower = pipe.encode_prompt(PROMPTS[2].lower(), None)[0]  # prompts are encoded as written, not lower-cased
    assert not torch.allclose(embeds[2], lower[0])
    assert encode(folder, tmp_path / "short.safetensors", "--max-length", "9") == 0
    assert assert_file_is(tmp_path / "short.safetensors", pipe, max_sequence_length=9)["prompt_embeds"].shape == (3, 9, JOINT)
    assert pipeline_class("black-forest-labs/FLUX.1-dev") == "FluxPipeline"  # an uncached hub id, by its name


def test_fit_encodes_a_prompt_text_file_with_the_flux_pipelines_encoders_and_calibrates(tmp_path, folder):
    cli = cli_main(fit_args(tmp_path, f"--data.cache_dir={tmp_path / 'cache'}",
                            model=["--model.model", str(folder / "pipeline"), f"--data.prompts={folder / 'prompts.txt'}",
                                   *SMALL]))
    encoded, expected = cli.datamodule.prompts, load_prompt_embeds(folder / "e.safetensors")
    assert set(encoded) == set(DISTILLED_KEYS) and all(torch.equal(encoded[key], expected[key]) for key in expected)
    assert len(list((tmp_path / "cache" / "prompt_embeds").glob("*.safetensors"))) == 1
    packed = FluxTransformer2DModel.from_pretrained(tmp_path / "packed")
    assert len(vq_layers(packed)) == 20  # every default Linear of the double and the single block


def test_a_negative_prompt_for_flux_is_one_error_line(tmp_path, folder, monkeypatch, capsys):
    out = tmp_path / "e.safetensors"
    assert encode(folder, out, "--negative-prompt", "blue") == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "guidance-distilled, with no unconditional branch" in lines[0] and not out.exists()
    code, err = run_main(monkeypatch, capsys, fit_args(
        tmp_path, f"--data.cache_dir={tmp_path / 'cache'}", "--data.negative_prompt=blue",
        model=["--model.model", str(folder / "pipeline"), f"--data.prompts={folder / 'prompts.txt'}", *SMALL]))
    lines = error_lines(err)
    assert code != 0 and len(lines) == 1 and "drop --negative-prompt / --data.negative_prompt ('blue')" in lines[0]
    assert not (tmp_path / "packed").exists()
