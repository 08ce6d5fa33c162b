"""The DiT-XL/2 configs: base + overlay give exactly the settings of the former one-file configs.

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
NEW_FILES = {  # legacy file -> the --config files that replace it
    "dit_xl2_256_w2": [BASE],
    "dit_xl2_256_w3": [BASE, ROOT / "configs" / "dit_xl2" / "256_w3.yaml"],
    "dit_xl2_512_w2": [BASE, ROOT / "configs" / "dit_xl2" / "512_w2.yaml"],
    "dit_xl2_512_w3": [BASE, ROOT / "configs" / "dit_xl2" / "512_w3.yaml"],
}
# Defaults that the parser shows as null and the code resolves later (Trainer: None -> 50).
RESOLVED_DEFAULTS = {"trainer.log_every_n_steps": 50}


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


def test_base_writes_no_code_default():
    """Every value the base writes differs from the default it would get without it."""
    defaults = flatten(effective_config())
    with open(BASE) as file:
        written = yaml.safe_load(file)
    restated = [key for key, value in flatten(written).items()
                if "callbacks" not in key and "logger" not in key and defaults.get(key) == value]
    for callback in written["trainer"]["callbacks"] + [written["trainer"]["logger"]]:
        module, _, name = callback["class_path"].rpartition(".")
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
        restated += [f"{name}.{key}" for key, value in callback.get("init_args", {}).items()
                     if parameters[key].default == value]
    assert not restated
