"""Zero-data calibration items: determinism, per-rank sharding, caching, shuffling."""

from types import SimpleNamespace

import pytest
import torch

from vq4dit.lightning.data import CalibrationDataModule
from vq4dit.trajectories import ShuffledBatches, TrajectoryPlan, generate_items, trajectory_plan
from vq4dit.models import load_dit
from vq4dit.sampling import SamplerConfig, initial_noise


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return load_dit("tiny")


def fake_trainer(teacher, rank=0, world=1, epoch=0):
    module = SimpleNamespace(teacher=teacher, shards_data=True, trajectory_teacher=lambda device: teacher.to(device))
    return SimpleNamespace(lightning_module=module, global_rank=rank, world_size=world, current_epoch=epoch,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def setup_datamodule(teacher, rank=0, world=1, **kwargs):
    data = CalibrationDataModule(**{"num_steps": 4, "num_classes": 10, "val_trajectories": 1, **kwargs})
    data.trainer = fake_trainer(teacher, rank, world)
    data.setup("fit")
    return data


def test_trajectory_plan_is_a_pure_function():
    assert trajectory_plan(3, 0, 4, 10) == trajectory_plan(3, 0, 4, 10)
    assert trajectory_plan(3, 0, 4, 10) != trajectory_plan(4, 0, 4, 10)
    assert trajectory_plan(3, 0, 4, 10) != trajectory_plan(3, 1, 4, 10)
    labels, seeds = trajectory_plan(0, 0, 4, 10)
    assert all(0 <= y < 10 for y in labels) and len(set(seeds)) == 4


def test_items_are_the_teacher_trajectory(teacher):
    config = SamplerConfig(num_steps=4, guidance_scale=4.0)
    items = generate_items(teacher, [0, 1], TrajectoryPlan(0, 2, 10, config), progress=False)
    assert items["x"].shape == (2 * 2 * 4, 4, 8, 8)
    # timesteps run from noisy to clean within each trajectory, as in sampling
    assert items["t"][:2].tolist() == [999, 999] and items["t"][-2:].tolist() == [0, 0]
    again = generate_items(teacher, [0, 1], TrajectoryPlan(0, 2, 10, config), progress=False)
    assert all(torch.equal(items[k], again[k]) for k in items)
    # a trajectory does not depend on which others are generated with it
    # (items are step-major: [steps, samples]; trajectory 1 = samples 2 and 3)
    alone = generate_items(teacher, [1], TrajectoryPlan(0, 2, 10, config), progress=False)
    together = items["x"].reshape(4, 4, -1)[:, 2:]
    # other batch composition, so rounding may differ: tolerance relative to the largest magnitude
    scale = items["x"].abs().max().item()
    torch.testing.assert_close(together, alone["x"].reshape(4, 2, -1), rtol=1e-4, atol=1e-4 * scale)
    assert not torch.allclose(items["x"].reshape(4, 4, -1)[:, :2], together, atol=1e-3)


def trajectories_by_plan(data, total: int) -> dict[tuple[int, int, int], torch.Tensor]:
    """``{(index, label, seed): x over the steps [S, C, H, W]}`` of a datamodule's train items.

    A sample is identified by its plan: its label (``y``, exact) and its seed, recognised by its first
    item, the initial noise of that seed (generator output, bit-identical in any batch).
    """
    items, hp = data.train_items, data.hparams
    steps = hp.num_steps
    xs, ys, ts = (items[k].reshape(steps, -1, *items[k].shape[1:]) for k in ("x", "y", "t"))
    plans = {}
    for index in range(total):
        labels, seeds = trajectory_plan(index, hp.seed, hp.classes_per_trajectory, hp.num_classes)
        plans.update({(index, label, s): initial_noise(xs.shape[2:], [s], "cpu")[0] for label, s in zip(labels, seeds)})
    found = {}
    for n in range(xs.shape[1]):
        keys = [key for key, noise in plans.items() if torch.equal(xs[0, n], noise)]
        assert len(keys) == 1, "every sample starts from the noise of exactly one planned seed"
        assert (ys[:, n] == keys[0][1]).all() and ts[:, n].tolist() == ts[:, 0].tolist()
        assert keys[0] not in found, "no sample generated twice"
        found[keys[0]] = xs[:, n]
    return found


def test_ranks_get_disjoint_complete_shards(teacher):
    single = setup_datamodule(teacher, num_trajectories=4, classes_per_trajectory=2)
    shards = [setup_datamodule(teacher, rank=r, world=2, num_trajectories=4, classes_per_trajectory=2) for r in (0, 1)]
    whole, parts = trajectories_by_plan(single, 4), [trajectories_by_plan(shard, 4) for shard in shards]
    assert len(whole) == 4 * 2
    assert not parts[0].keys() & parts[1].keys()  # none duplicated: plans compared exactly
    assert parts[0].keys() | parts[1].keys() == whole.keys()  # none dropped
    # values: computed in other batch compositions, so kernels may round differently (random weights
    # make magnitudes of hundreds): equal up to float32 error relative to the largest value
    scale = single.train_items["x"].abs().max().item()
    for part in parts:
        for key, x in part.items():
            torch.testing.assert_close(x, whole[key], rtol=1e-4, atol=1e-4 * scale)
    with pytest.raises(ValueError, match="divisible"):
        setup_datamodule(teacher, rank=0, world=3, num_trajectories=4)


def test_cache_round_trip(teacher, tmp_path):
    first = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("trajectories-*.safetensors"))
    assert len(files) == 2  # train + val
    second = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path))
    assert all(torch.equal(first.train_items[k], second.train_items[k]) for k in first.train_items)


def test_cache_is_keyed_on_the_weights(teacher, tmp_path):
    """Other weights under the same source and settings never reuse the old trajectories."""
    first = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path), val_trajectories=0)
    changed = load_dit("tiny")
    changed.load_state_dict(teacher.state_dict())
    with torch.no_grad():
        changed.proj_out_2.bias.add_(0.5)
    second = setup_datamodule(changed, num_trajectories=2, cache_dir=str(tmp_path), val_trajectories=0)
    assert len(list(tmp_path.glob("trajectories-*.safetensors"))) == 2
    assert not torch.equal(first.train_items["x"], second.train_items["x"])


def test_corrupt_cache_file_is_named_and_regenerated(teacher, tmp_path, caplog):
    first = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path), val_trajectories=0)
    (cache,) = tmp_path.glob("trajectories-*.safetensors")
    cache.write_bytes(b"not a safetensors file")
    with caplog.at_level("WARNING"):
        second = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path), val_trajectories=0)
    assert cache.name in caplog.text and "generating the trajectories again" in caplog.text
    assert all(torch.equal(first.train_items[k], second.train_items[k]) for k in first.train_items)
    assert second.train_items["x"].shape == first.train_items["x"].shape
    assert len(list(tmp_path.iterdir())) == 1  # rewritten in place, no temporary file left


def test_cache_dir_under_a_file_is_one_clear_error(teacher, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ValueError, match="cache_dir"):
        setup_datamodule(teacher, num_trajectories=2, cache_dir=str(blocker / "cache"), val_trajectories=0)


def test_shuffle_is_seeded_by_epoch():
    items = {"x": torch.arange(20.0).reshape(20, 1), "t": torch.arange(20), "y": torch.zeros(20, dtype=torch.long)}
    epoch = {"value": 0}
    batches = ShuffledBatches(items, 6, seed=0, shuffle=True, epoch_fn=lambda: epoch["value"])
    first = [b[1].tolist() for b in batches]
    assert [b[1].tolist() for b in batches] == first  # same epoch, same order (resume)
    epoch["value"] = 1
    second = [b[1].tolist() for b in batches]
    assert second != first
    assert sorted(sum(first, [])) == sorted(sum(second, [])) == list(range(20))  # every item once
    assert len(batches) == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [({"num_trajectories": 0}, "num_trajectories"), ({"batch_size": 0}, "batch_size"),
     ({"guidance_scale": 0.5}, "guidance_scale"), ({"num_steps": 0}, "num_steps"), ({"sampler": "euler"}, "sampler")],
)
def test_invalid_settings(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CalibrationDataModule(**kwargs)


def test_trajectories_are_sampled_on_the_trainer_device(monkeypatch):
    """Lightning moves the module to the GPU only after setup: the teacher must get there first."""
    import vq4dit.trajectories as data_module

    seen = []

    def record(teacher, indices, *args, **kwargs):
        seen.append(next(teacher.parameters()).device)
        return {"x": torch.zeros(1, 4, 8, 8), "t": torch.zeros(1, dtype=torch.long), "y": torch.zeros(1, dtype=torch.long)}

    monkeypatch.setattr(data_module, "generate_items", record)
    teacher = load_dit("tiny")
    data = CalibrationDataModule(num_steps=4, num_classes=10, val_trajectories=1)
    data.trainer = fake_trainer(teacher)
    data.trainer.strategy.root_device = torch.device("meta")  # stands in for cuda:N (none here)
    data.setup("fit")
    assert seen == [torch.device("meta")] * 2  # train and validation trajectories

