"""``spread_blocks``: DiT blocks spread over 2 DDP processes (gloo, CPU) give the one-process model."""

import os
import socket
import subprocess
import sys

import pytest
import torch
import yaml

from train import cli_main
from vq4dit.lightning import CalibrationModule
from vq4dit.distributed import BlockSpread

# The random tiny preset (2 blocks: one per rank); k=16, d=2 = 2 bits per weight.
TINY = ["--model.model=tiny", "--model.vq.codebook_size=16", "--model.vq.subvector_dim=2", "--data.num_classes=1000"]
# A fast schedule that still exercises everything the ranks must agree on: rows harden and
# candidates are pruned (soft sizes change), codebooks start training once their layer is hard,
# the stop rule ends the run on a loss plateau, samples are drawn and checkpoints saved mid-epoch.
CALLBACKS = [
    {"class_path": "callbacks.CandidatePruning", "init_args": {"every_n_steps": 1}},
    {"class_path": "callbacks.CalibrationStop",
     "init_args": {"min_codebook_steps": 4, "patience": 4, "max_steps": 2000}},
    {"class_path": "callbacks.SampleImages", "init_args": {"every_n_steps": 10, "labels": [0, 1], "num_steps": 2}},
    {"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
     "init_args": {"save_last": True, "every_n_train_steps": 12, "save_top_k": -1}},
]


def write_config(folder):
    with open("configs/demo.yaml") as file:
        config = yaml.safe_load(file)
    config["trainer"]["callbacks"] = CALLBACKS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fit_args(config, run_dir, *extra):
    return [
        "fit", "--config", str(config),
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        f"--trainer.default_root_dir={run_dir}", f"--trainer.logger.init_args.save_dir={run_dir}",
        f"--model.export.dir={run_dir / 'packed'}",
        "--data.num_trajectories=2", "--data.num_steps=8", "--data.val_trajectories=1",
        # lr_logits 0.4: all rows hard at step ~28, the stop rule ends the run at ~46 of 64
        "--model.calibration.block_inputs=teacher", "--model.calibration.lr_logits=0.4", "--trainer.max_epochs=4",
        "--model.allocation.enabled=false", *TINY, *extra,
    ]


def packed_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "diffusion_pytorch_model.safetensors"))


def read_png(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image).copy())


def assert_same_packed_model(a, b):
    a, b = packed_tensors(a), packed_tensors(b)
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():  # codebooks, biases: float tolerance
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)
        else:  # packed codes: exactly the same codewords chosen
            assert torch.equal(a[key], b[key]), key


def test_spread_blocks_needs_teacher_inputs():
    with pytest.raises(ValueError, match="spread_blocks needs calibration.block_inputs='teacher'"):
        CalibrationModule(model="tiny", spread_blocks=True, calibration={"block_inputs": "student"})


def test_round_robin_ownership():
    layer_blocks = {"b0.q": 0, "b1.q": 1, "b2.q": 2, "head": None}
    ranks = [BlockSpread(layer_blocks, num_blocks=3, rank=r, world_size=2) for r in range(2)]
    assert [s.owned_blocks for s in ranks] == [[0, 2], [1]]
    assert [ranks[1].layer_owner(n) for n in layer_blocks] == [0, 1, 0, 0]  # outside the blocks: rank 0
    assert BlockSpread(layer_blocks, num_blocks=3, rank=3, world_size=4).owned_blocks == []
    with pytest.raises(ValueError):
        BlockSpread(layer_blocks, num_blocks=3, rank=2, world_size=2)


def free_port() -> int:
    with socket.socket() as probe:  # two DDP runs on one port would deadlock
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def assert_same_checkpoint(a, b):
    """Same step, student, optimizer state (every block's: ranks share before saving) and stop state."""
    a, b = (torch.load(path, weights_only=True, map_location="cpu") for path in (a, b))
    assert a["global_step"] == b["global_step"] and "ddp_anchor" not in b["state_dict"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    state_a, state_b = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    assert state_a.keys() == state_b.keys()
    for index in state_a:
        for key in state_a[index]:
            assert torch.equal(state_a[index][key], state_b[index][key]), (index, key)
    assert a["vq4dit"]["gate_minimum"] == b["vq4dit"]["gate_minimum"]
    stop_state = [key for key in a["callbacks"] if key.startswith("CalibrationStop")]
    assert stop_state and all(a["callbacks"][key] == b["callbacks"][key] for key in stop_state)


def test_two_processes_give_the_one_process_model(tmp_path):
    config = write_config(tmp_path)
    single, spread = tmp_path / "single", tmp_path / "spread"
    # The 2-process run starts first: its start-up (imports, process group) overlaps the baseline.
    ddp = subprocess.Popen(
        [sys.executable, "train.py", *fit_args(config, spread, "--model.spread_blocks=true"),
         "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())},
    )
    try:
        steps = cli_main(fit_args(config, single)).trainer.global_step
        _, stderr = ddp.communicate(timeout=300)
    finally:
        ddp.kill()
    assert ddp.returncode == 0, stderr[-3000:]
    assert 16 < steps < 64  # the stop rule ended the run after the first epoch, before max_epochs
    assert_same_packed_model(single / "packed", spread / "packed")
    # rank 0 sampled mid-run and at the end with every block current: the one-process images
    grids = sorted(p.name for p in single.rglob("samples/step_*.png"))
    assert len(grids) >= 4 and grids == sorted(p.name for p in spread.rglob("samples/step_*.png"))
    for name in grids:
        assert torch.equal(read_png(next(single.rglob(name))), read_png(next(spread.rglob(name)))), name

    checkpoints = sorted(p.name for p in single.rglob("*.ckpt"))
    assert len(checkpoints) >= 4 and checkpoints == sorted(p.name for p in spread.rglob("*.ckpt"))
    for name in checkpoints:  # rank 0's checkpoints hold every block: a resume continues exactly
        assert_same_checkpoint(next(single.rglob(name)), next(spread.rglob(name)))
