"""Golden behaviour: the demo's calibration gives bit-identical packed tensors across refactors.

``tests/golden/demo_short_layers.safetensors`` holds the quantized layers' tensors (codebooks,
packed codes, biases) of ``train.py fit --config configs/demo.yaml --config tests/golden/demo_short.yaml``
(the demo's settings, 100 steps) recorded before the calibration engine was introduced (commit
c21e556). Same seeds, same settings, one thread: the export must not change by a single bit. A
deliberate change of calibration behaviour re-records the file and says so in its commit.
"""

from safetensors.torch import load_file

from train import cli_main

GOLDEN = "tests/golden/demo_short_layers.safetensors"


def test_demo_export_is_bit_identical_to_the_recorded_one(tmp_path):
    cli_main([
        "fit", "--config", "configs/demo.yaml", "--config", "tests/golden/demo_short.yaml",
        f"--model.export_dir={tmp_path / 'packed'}", f"--trainer.default_root_dir={tmp_path}",
    ])
    golden, exported = load_file(GOLDEN), load_file(str(tmp_path / "packed" / "diffusion_pytorch_model.safetensors"))
    assert set(golden) <= set(exported)
    changed = [key for key in sorted(golden) if not golden[key].equal(exported[key])]
    assert not changed, f"{len(changed)} of {len(golden)} packed tensors differ, e.g. {changed[:5]}"
