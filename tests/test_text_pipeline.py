"""A user's text-conditioned workflow end to end with real Hugging Face components (issue 21):
a tiny random PixArt-Σ pipeline folder (T5 encoder, fast tokenizer, VAE, scheduler) built offline,
``python -m vq4dit.prompts encode`` on it, ``train.py fit`` from those embeddings, and the packed
transformer inside stock ``PixArtSigmaPipeline`` (CPU, offline, ~10 s)."""

import pytest
import torch

pytest.importorskip("transformers", minversion="5")  # the `text` / `test` extras

from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

import vq4dit  # noqa: F401  (registers the vq4dit backend: stock from_pretrained loads packed models)
from tests.test_calibration import fit_args
from tests.test_families import tiny_pixart
from tests.test_text_fit import SMALL
from train import cli_main
from vq4dit.prompts import check_prompts_fit, load_prompt_embeds
from vq4dit.prompts.__main__ import main as prompts_main
from vq4dit.quantize import vq_layers

WORDS = ["a", "red", "blue", "circle", "square", "on", "the", "left", "right"]
PROMPTS = ["a red circle", "a blue square on the left", "the red square on the right"]
WIDTH = 16  # the T5's d_model = the transformer's caption_channels
SIZE = 16  # image height and width: 8x8 latents, VAE scale factor 2


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A case-sensitive word-level tokenizer that ends every text with ``</s>``, as T5's does."""
    vocabulary = {word: index for index, word in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocabulary, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5(width: int) -> T5EncoderModel:
    """A random 2-layer T5 encoder ``width`` wide over :func:`tiny_tokenizer`'s vocabulary."""
    return T5EncoderModel(T5Config(vocab_size=3 + len(WORDS), d_model=width, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                   decoder_start_token_id=0)).eval()


def tiny_pipeline() -> PixArtSigmaPipeline:
    """A random PixArt-Σ pipeline: 2-block transformer, 2-layer T5 (16 wide), 2-level VAE with
    PixArt-Σ's scaling factor, DPM-Solver++ over PixArt's 1000 linear betas."""
    torch.manual_seed(0)
    encoder = tiny_t5(WIDTH)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=SIZE, scaling_factor=0.13025).eval()
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02,
                                            beta_schedule="linear")
    return PixArtSigmaPipeline(tokenizer=tiny_tokenizer(), text_encoder=encoder, vae=vae,
                               transformer=tiny_pixart(caption_channels=WIDTH), scheduler=scheduler)


def generate(pipe: PixArtSigmaPipeline, output_type: str = "pt", prompt: str = "a red circle") -> torch.Tensor:
    """``[1, 3, SIZE, SIZE]`` images in [0, 1] (``"pt"``) or ``[1, 4, 8, 8]`` latents (``"latent"``), seed 7."""
    return pipe(prompt, num_inference_steps=2, height=SIZE, width=SIZE, output_type=output_type,
                use_resolution_binning=False, generator=torch.Generator().manual_seed(7)).images


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The user's steps: the pipeline folder, the encode command, ``train.py fit`` (packed/)."""
    root = tmp_path_factory.mktemp("workflow")
    folder = root / "pipeline"
    tiny_pipeline().save_pretrained(folder)
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n\n")
    embeds = root / "e.safetensors"
    assert prompts_main(["encode", "--pipeline", str(folder), "--prompts", str(root / "prompts.txt"),
                         "--out", str(embeds)]) == 0
    cli_main(fit_args(root, "--trainer.max_epochs=2",
                      model=["--model.model", str(folder), "--data.prompt_embeds", str(embeds), *SMALL]))
    return folder, embeds, root / "packed"


def test_the_encode_command_writes_what_the_pipeline_encodes(workflow):
    folder, embeds, _ = workflow
    prompts = load_prompt_embeds(embeds)
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    expected = pipe.encode_prompt(PROMPTS, negative_prompt="", clean_caption=False, max_sequence_length=300)
    keys = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
    for key, tensor in zip(keys, expected):
        if key.startswith("negative"):  # the pipeline repeats the negative prompt once per prompt
            assert bool((tensor == tensor[:1]).all()), key
            tensor = tensor[:1]
        assert prompts[key].shape == tensor.shape, key  # [3, 300, 16], [3, 300], [1, 300, 16], [1, 300]
        torch.testing.assert_close(prompts[key], tensor.to(prompts[key].dtype), rtol=1e-5, atol=1e-5, msg=key)
    assert prompts["prompt_attention_mask"].sum(1).tolist() == [4, 7, 7]  # the words and </s>, then padding
    assert prompts["negative_prompt_attention_mask"].sum().item() == 1  # "" is </s> alone
    assert not torch.allclose(prompts["prompt_embeds"][0], prompts["prompt_embeds"][1])
    check_prompts_fit(pipe.transformer, prompts, str(embeds))


def test_a_capitalised_prompt_encodes_as_the_pipeline_sees_it(tmp_path, workflow):
    folder = workflow[0]
    (tmp_path / "prompts.txt").write_text("A red circle\n")
    assert prompts_main(["encode", "--pipeline", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                         "--out", str(tmp_path / "e.safetensors")]) == 0
    pipe = PixArtSigmaPipeline.from_pretrained(folder)
    expected = pipe.encode_prompt("A red circle", clean_caption=False, max_sequence_length=300)[0]
    torch.testing.assert_close(load_prompt_embeds(tmp_path / "e.safetensors")["prompt_embeds"], expected)
    assert prompts_main(["encode", "--pipeline", str(folder), "--prompts", str(tmp_path / "prompts.txt"),
                         "--out", str(tmp_path / "k.safetensors"), "--keep-case"]) == 0  # as written: other tokens
    assert not torch.allclose(load_prompt_embeds(tmp_path / "k.safetensors")["prompt_embeds"], expected)


def test_the_packed_transformer_generates_in_the_stock_pipeline_close_to_the_fp_one(workflow):
    folder, _, packed_folder = workflow
    packed = PixArtTransformer2DModel.from_pretrained(packed_folder)
    assert len(vq_layers(packed)) == 20  # 10 per block
    fp_pipe = PixArtSigmaPipeline.from_pretrained(folder)
    pipe = PixArtSigmaPipeline.from_pretrained(folder, transformer=packed)
    assert pipe.transformer is packed
    fp_latents, latents = generate(fp_pipe, "latent"), generate(pipe, "latent")
    assert latents.shape == (1, 4, 8, 8)
    error = float((latents - fp_latents).norm() / fp_latents.norm())
    assert 0 < error < 0.15, error  # 2 bits per weight, 2 guided DPM-Solver++ steps: 0.06 measured
    fp_images, images = generate(fp_pipe), generate(pipe)
    assert images.shape == (1, 3, SIZE, SIZE) and bool(torch.isfinite(images).all())
    assert not torch.equal(images, fp_images) and float((images - fp_images).abs().mean()) < 0.05
    other = generate(pipe, prompt="a blue square on the left")  # the prompt reaches the packed transformer
    assert float((other - images).abs().mean()) > float((images - fp_images).abs().mean())


def test_a_pipeline_saved_with_the_packed_transformer_loads_back_with_stock_from_pretrained(tmp_path, workflow):
    folder, _, packed_folder = workflow
    pipe = PixArtSigmaPipeline.from_pretrained(folder, transformer=PixArtTransformer2DModel.from_pretrained(packed_folder))
    pipe.save_pretrained(tmp_path / "out")
    config = PixArtTransformer2DModel.load_config(tmp_path / "out" / "transformer")
    assert config["quantization_config"]["quant_method"] == "vq4dit"
    size = {name: sum(f.stat().st_size for f in (root / "transformer").glob("*.safetensors"))
            for name, root in (("fp", folder), ("packed", tmp_path / "out"))}
    assert size["packed"] < size["fp"], size  # written packed (codes and codebooks), not dequantized
    loaded = PixArtSigmaPipeline.from_pretrained(tmp_path / "out")
    assert len(vq_layers(loaded.transformer)) == 20
    assert torch.equal(generate(loaded), generate(pipe))


def test_fit_encodes_a_prompt_text_file_with_the_pipelines_own_t5(tmp_path, workflow):
    """``--data.prompts`` with no ``--data.text_encoder``: the model's pipeline folder encodes them
    (once, cached), the same embeddings as the encode command's."""
    folder, embeds, _ = workflow
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    cli = cli_main(fit_args(tmp_path, "--trainer.max_epochs=1", f"--data.cache_dir={tmp_path / 'cache'}",
                            model=["--model.model", str(folder), f"--data.prompts={tmp_path / 'prompts.txt'}", *SMALL]))
    encoded, expected = cli.datamodule.prompts, load_prompt_embeds(embeds)
    assert all(torch.equal(encoded[key], expected[key]) for key in expected)
    assert len(list((tmp_path / "cache" / "prompt_embeds").glob("*.safetensors"))) == 1
