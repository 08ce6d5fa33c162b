"""SD3's text path end to end with real Hugging Face components (issue 22): a tiny random
``StableDiffusion3Pipeline`` folder (two ``CLIPTextModelWithProjection`` s, a T5, fast tokenizers
built offline with ``tokenizers``, a tiny SD3.5-style transformer and VAE), ``python -m
vq4dit.prompts encode`` on it against the pipeline's own ``encode_prompt``, and ``train.py fit
--data.prompts`` calibrating from it (CPU, offline, ~10 s)."""

import dataclasses

import pytest
import torch

pytest.importorskip("transformers", minversion="5")  # the `text` / `test` extras

from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, PreTrainedTokenizerFast

from tests.test_calibration import fit_args
from tests.test_mmdit import JOINT, POOLED, SD35, SMALL, tiny_sd3, tiny_vae
from tests.test_text_pipeline import WORDS, tiny_t5, tiny_tokenizer
from train import cli_main
from vq4dit.families import SD3
from vq4dit.prompts import check_encodable, check_prompts_fit, load_prompt_embeds
from vq4dit.prompts import encode as encode_module
from vq4dit.prompts.__main__ import main as prompts_main
from vq4dit.quantize import vq_layers

PROMPTS = ["a red circle", "a blue square on the left", "The red square on the right"]  # "The": <unk>, as written
CLIP_LENGTH = 77  # the CLIP tokenizers' model_max_length: SD3's tokenizer_max_length
CLIPS = ((4, 4), (6, 6))  # (hidden, projection) of CLIP-L and CLIP-G: 10 channels padded to T5's 12, pooled 10


def clip_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer framing every text as CLIP's does (``<|startoftext|> ... <|endoftext|>``,
    padded with ``<|endoftext|>``), 77 tokens long."""
    vocabulary = {word: index for index, word in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<unk>", model_max_length=CLIP_LENGTH)


def tiny_clip(hidden: int, projection: int) -> CLIPTextModelWithProjection:
    """A random 2-layer CLIP text encoder with a projection (its pooled ``text_embeds``)."""
    config = CLIPTextConfig(vocab_size=3 + len(WORDS), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_LENGTH,
                            projection_dim=projection, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return CLIPTextModelWithProjection(config).eval()


def tiny_sd3_pipeline(t5: bool = True) -> StableDiffusion3Pipeline:
    """A random SD3.5-style pipeline: CLIP-L, CLIP-G, T5 (or none), 2-block transformer, VAE."""
    torch.manual_seed(0)
    clips = [tiny_clip(*widths) for widths in CLIPS]
    return StableDiffusion3Pipeline(
        transformer=tiny_sd3(**SD35), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(),
        text_encoder=clips[0], tokenizer=clip_tokenizer(), text_encoder_2=clips[1], tokenizer_2=clip_tokenizer(),
        text_encoder_3=tiny_t5(JOINT) if t5 else None, tokenizer_3=tiny_tokenizer() if t5 else None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The pipeline folder, the prompt file, and the encode command's output ``e.safetensors``."""
    root = tmp_path_factory.mktemp("sd3_text")
    tiny_sd3_pipeline().save_pretrained(root / "pipeline")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    assert prompts_main(["encode", "--pipeline", str(root / "pipeline"), "--prompts", str(root / "prompts.txt"),
                         "--out", str(root / "e.safetensors"), "--negative-prompt", "blue"]) == 0
    return root


def expected_file(pipe: StableDiffusion3Pipeline, prompts: list[str], negative: str) -> dict[str, torch.Tensor]:
    """``pipe.encode_prompt``'s four outputs under the file's keys (the negative prompt once)."""
    embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(prompts, None, None, negative_prompt=negative)
    for tensor in (negative_embeds, negative_pooled):  # the pipeline repeats the negative prompt per prompt
        torch.testing.assert_close(tensor, tensor[:1].expand_as(tensor), rtol=1e-5, atol=1e-6)
    return {"prompt_embeds": embeds, "negative_prompt_embeds": negative_embeds[:1], "pooled_prompt_embeds": pooled,
            "negative_pooled_prompt_embeds": negative_pooled[:1]}


def assert_file_is(path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prompts = load_prompt_embeds(path)
    assert set(prompts) == {*expected, "prompt_attention_mask", "negative_prompt_attention_mask"}
    for key, tensor in expected.items():
        assert prompts[key].shape == tensor.shape, key
        torch.testing.assert_close(prompts[key], tensor.float(), rtol=1e-5, atol=1e-5, msg=key)
    for key in ("prompt_attention_mask", "negative_prompt_attention_mask"):  # SD3 has no masks: all ones
        assert bool((prompts[key] == 1).all()) and prompts[key].shape == prompts[key.replace("attention_mask", "embeds")].shape[:2]
    return prompts


def test_the_encode_command_writes_what_the_sd3_pipelines_encode_prompt_returns(folder):
    pipe = StableDiffusion3Pipeline.from_pretrained(folder / "pipeline")
    prompts = assert_file_is(folder / "e.safetensors", expected_file(pipe, PROMPTS, "blue"))
    assert prompts["prompt_embeds"].shape == (3, CLIP_LENGTH + 256, JOINT)  # 77 CLIP + 256 T5 tokens
    assert prompts["pooled_prompt_embeds"].shape == (3, POOLED)
    clip, t5 = prompts["prompt_embeds"][:, :CLIP_LENGTH], prompts["prompt_embeds"][:, CLIP_LENGTH:]
    assert bool((clip[..., 10:] == 0).all()) and bool(clip[..., :10].abs().gt(0).all())  # 4 + 6 CLIP channels, padded
    assert not torch.allclose(t5[0], t5[1]) and not torch.allclose(prompts["pooled_prompt_embeds"][0], prompts["pooled_prompt_embeds"][1])
    check_prompts_fit(pipe.transformer, prompts, "e.safetensors")
    lower = pipe.encode_prompt(PROMPTS[2].lower(), None, None)[0]  # prompts are encoded as written, not lower-cased
    assert not torch.allclose(prompts["prompt_embeds"][2], lower[0])


def test_a_pipeline_without_t5_encodes_zeros_there_as_the_pipeline_does_and_max_length_is_t5s(tmp_path):
    pipe = tiny_sd3_pipeline(t5=False)
    pipe.save_pretrained(tmp_path / "pipeline")
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    assert prompts_main(["encode", "--pipeline", str(tmp_path / "pipeline"), "--prompts", str(tmp_path / "prompts.txt"),
                         "--out", str(tmp_path / "e.safetensors"), "--max-length", "9"]) == 0
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(["a red circle"], None, None, max_sequence_length=9)
    prompts = assert_file_is(tmp_path / "e.safetensors", {"prompt_embeds": embeds, "negative_prompt_embeds": negative,
                                                          "pooled_prompt_embeds": pooled,
                                                          "negative_pooled_prompt_embeds": negative_pooled})
    assert prompts["prompt_embeds"].shape == (1, CLIP_LENGTH + 9, JOINT) and not prompts["prompt_embeds"][:, CLIP_LENGTH:].any()


def test_fit_encodes_a_prompt_text_file_with_the_sd3_pipelines_encoders_and_calibrates(tmp_path, folder):
    cli = cli_main(fit_args(tmp_path, f"--data.cache_dir={tmp_path / 'cache'}", "--data.negative_prompt=blue",
                            model=["--model.model", str(folder / "pipeline"), f"--data.prompts={folder / 'prompts.txt'}",
                                   *SMALL]))
    encoded, expected = cli.datamodule.prompts, load_prompt_embeds(folder / "e.safetensors")
    assert set(encoded) == set(expected) and all(torch.equal(encoded[key], expected[key]) for key in expected)
    assert len(list((tmp_path / "cache" / "prompt_embeds").glob("*.safetensors"))) == 1
    from diffusers import SD3Transformer2DModel

    packed = SD3Transformer2DModel.from_pretrained(tmp_path / "packed")
    assert len(vq_layers(packed)) == 29  # every default Linear of the 2 SD3.5-style blocks


def test_a_pooled_family_without_an_encoder_keeps_its_error(tmp_path, monkeypatch):
    """What a future pooled family meets until it has an encoder: the fit check and the command each say so."""
    check_encodable(tiny_sd3())  # SD3 is encodable
    other = dataclasses.replace(SD3, name="Other", pipelines=("OtherPipeline",))
    monkeypatch.setattr("vq4dit.prompts.family_of", lambda model: other)
    with pytest.raises(ValueError, match="--data.prompts cannot encode the pooled embeddings a Other model needs yet"):
        check_encodable(tiny_sd3())
    monkeypatch.setattr(encode_module, "FAMILIES", (other,))
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text('{"_class_name": "OtherPipeline"}')
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    with pytest.raises(ValueError, match="cannot encode the pooled embeddings of a OtherPipeline yet"):
        encode_module.encode_file(str(tmp_path / "pipe"), tmp_path / "prompts.txt", tmp_path / "e.safetensors")
    assert encode_module.pipeline_class("stabilityai/stable-diffusion-3.5-large") == "StableDiffusion3Pipeline"
    assert encode_module.pipeline_class("PixArt-alpha/PixArt-Sigma-XL-2-1024-MS") is None  # the T5 path
