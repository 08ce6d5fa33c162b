"""The DiT-XL/2 configs: base + overlay give exactly the settings of the former one-file configs.
The PixArt-Σ configs (1024 base + 512 overlay): PixArtSigmaPipeline's sampling defaults, one GPU, bf16.
The SD3.5 configs (Large, Medium): their model cards' steps and guidance, one GPU, bf16.
The FLUX.1 configs (dev base + schnell overlay): FluxPipeline's dev defaults (28 steps, embedded guidance 3.5),
schnell's 4 steps without guidance, one GPU, bf16.

``tests/data/legacy_configs`` holds the four former files verbatim (flat ``model:`` names, which the CLI
translates to the nested settings, as it does for any former config). Both sides are parsed by the real
CLI parser (``--print_config``: every default filled in, nothing loaded or downloaded), so a value
equal to a code default counts the same whether a file writes it or not.
"""

import importlib
import inspect
from pathlib import Path

import pytest
import yaml

from train import effective_config

ROOT = Path(__file__).resolve().parents[1]
LEGACY = ROOT / "tests" / "data" / "legacy_configs"
BASE = ROOT / "configs" / "dit_xl2.yaml"
PIXART = {1024: [ROOT / "configs" / "pixart_sigma_1024.yaml"],
          512: [ROOT / "configs" / "pixart_sigma_1024.yaml", ROOT / "configs" / "pixart_sigma_512.yaml"]}
SD35 = {"large": (28, 3.5), "medium": (40, 4.5)}  # the model cards' steps and guidance
FLUX = {"dev": ([ROOT / "configs" / "flux_dev.yaml"], 28, 3.5),  # FluxPipeline's defaults; schnell's model card
        "schnell": ([ROOT / "configs" / "flux_dev.yaml", ROOT / "configs" / "flux_schnell.yaml"], 4, 1.0)}
NEW_FILES = {  # legacy file -> the --config files that replace it
    "dit_xl2_256_w2": [BASE],
    "dit_xl2_256_w3": [BASE, ROOT / "configs" / "dit_xl2" / "256_w3.yaml"],
    "dit_xl2_512_w2": [BASE, ROOT / "configs" / "dit_xl2" / "512_w2.yaml"],
    "dit_xl2_512_w3": [BASE, ROOT / "configs" / "dit_xl2" / "512_w3.yaml"],
}
# Defaults that the parser shows as null and the code resolves later (Trainer: None -> 50; the DDPM sampler).
RESOLVED_DEFAULTS = {"trainer.log_every_n_steps": 50, "data.sampler": "ddpm"}


def flatten(value, prefix=""):
    """{dotted key: leaf value}; list items are keyed by their index."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        items = enumerate(value)
    else:
        return {prefix: RESOLVED_DEFAULTS.get(prefix, value) if value is None else value}
    flat = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


@pytest.fixture(scope="module")
def configs():
    parsed = {name: (flatten(effective_config(LEGACY / f"{name}.yaml")), flatten(effective_config(*files)))
              for name, files in NEW_FILES.items()}
    # the outputs of the four runs must not overwrite each other
    for key in ("model.export.dir", "trainer.default_root_dir", "trainer.logger.init_args.save_dir"):
        assert len({new[key] for _, new in parsed.values()}) == len(NEW_FILES), key
    return parsed


@pytest.mark.parametrize("name", NEW_FILES)
def test_overlays_equal_the_former_configs(name, configs):
    old, new = configs[name]
    assert sorted(new) == sorted(old)
    differing = {key: (old[key], new[key]) for key in old if old[key] != new[key]}
    assert not differing, f"{name}: key: (former, new) {differing}"


@pytest.mark.parametrize("base", [BASE, PIXART[1024][0], *(ROOT / "configs" / f"sd35_{m}.yaml" for m in SD35),
                                  FLUX["dev"][0][0]], ids=["dit_xl2", "pixart_sigma", *(f"sd35_{m}" for m in SD35), "flux_dev"])
def test_base_writes_no_code_default(base):
    """Every value the base writes differs from the default it would get without it."""
    defaults = flatten(effective_config())
    with open(base) as file:
        written = yaml.safe_load(file)
    restated = [key for key, value in flatten(written).items()
                if "callbacks" not in key and "logger" not in key and defaults.get(key) == value]
    for callback in written["trainer"]["callbacks"] + [written["trainer"]["logger"]]:
        module, _, name = callback["class_path"].rpartition(".")
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        restated += [f"{name}.{key}" for key, value in callback.get("init_args", {}).items()
                     if parameters[key].default == value]
    assert not restated


def test_pixart_configs_are_the_pipeline_defaults_on_one_gpu_in_bf16():
    """Both PixArt-Σ runs parse with the real CLI parser (nothing loaded): the pipeline's 20 steps and
    guidance 4.5, the prompts file of the encode command, a bf16 teacher, and outputs of their own."""
    parsed = {size: flatten(effective_config(*files)) for size, files in PIXART.items()}
    for size, config in parsed.items():
        assert config["model.model"] == f"PixArt-alpha/PixArt-Sigma-XL-2-{size}-MS"
        assert (config["trainer.devices"], config["trainer.precision"]) == (1, "bf16-mixed")
        assert config["model.calibration.teacher_dtype"] == "bfloat16"
        assert (config["data.sampler"], config["data.num_steps"], config["data.guidance_scale"]) == ("ddim", 20, 4.5)
        assert config["data.prompt_embeds"] == "outputs/pixart_sigma_prompts.safetensors"
        assert config["data.guided_channels"] is None  # PixArt guides every latent channel
        assert not any("SampleImages" in str(value) for value in config.values())
    for key in ("model.export.dir", "trainer.default_root_dir", "trainer.logger.init_args.save_dir"):
        assert parsed[512][key] != parsed[1024][key] and "512" in parsed[512][key], key


def test_sd35_configs_are_the_model_cards_sampling_on_one_gpu_in_bf16():
    """Both SD3.5 configs parse with the real CLI parser (nothing loaded): the model card's steps and
    guidance, the encode command's prompts file, a bf16 teacher, and outputs of their own."""
    parsed = {name: flatten(effective_config(ROOT / "configs" / f"sd35_{name}.yaml")) for name in SD35}
    for name, config in parsed.items():
        assert config["model.model"] == f"stabilityai/stable-diffusion-3.5-{name}"
        assert (config["trainer.devices"], config["trainer.precision"]) == (1, "bf16-mixed")
        assert config["model.calibration.teacher_dtype"] == "bfloat16"
        assert (config["data.num_steps"], config["data.guidance_scale"]) == SD35[name]
        assert config["data.prompt_embeds"] == f"outputs/sd35_{name}_prompts.safetensors"
        assert config["data.guided_channels"] is None  # SD3 guides every latent channel
        for key in ("model.export.dir", "trainer.default_root_dir", "trainer.logger.init_args.save_dir"):
            assert f"sd35_{name}_w2" in config[key], key
        header = (ROOT / "configs" / f"sd35_{name}.yaml").read_text().split("\nmodel:")[0]
        for command in ("python -m vq4dit.prompts encode", "python train.py fit", "--model.vq.bits 3"):
            assert command in header, (name, command)


def test_flux_configs_are_the_pipeline_defaults_on_one_gpu_in_bf16():
    """FLUX.1-dev (base) and FLUX.1-schnell (overlay) parse with the real CLI parser (nothing loaded): their
    steps and guidance, the encode command's prompts file, a bf16 teacher, and outputs of their own."""
    parsed = {name: flatten(effective_config(*files)) for name, (files, _, _) in FLUX.items()}
    for name, config in parsed.items():
        assert config["model.model"] == f"black-forest-labs/FLUX.1-{name}"
        assert (config["trainer.devices"], config["trainer.precision"]) == (1, "bf16-mixed")
        assert config["model.calibration.teacher_dtype"] == "bfloat16"
        assert (config["data.num_steps"], config["data.guidance_scale"]) == FLUX[name][1:]
        assert config["data.prompt_embeds"] == f"outputs/flux_{name}_prompts.safetensors"
        for key in ("model.export.dir", "trainer.default_root_dir", "trainer.logger.init_args.save_dir"):
            assert f"flux_{name}_w2" in config[key], key
        assert config["trainer.logger.init_args.name"] == "tensorboard"  # the overlay merges into the base's logger
    for path in (ROOT / "configs" / "flux_dev.yaml", ROOT / "configs" / "flux_schnell.yaml"):
        header = path.read_text().split("\nmodel:")[0]
        for command in ("python -m vq4dit.prompts encode", "python train.py fit"):
            assert command in header, (path.name, command)
    assert "window_blocks" in (ROOT / "configs" / "flux_dev.yaml").read_text()  # the way once it is built
