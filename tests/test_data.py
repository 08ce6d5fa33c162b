"""Zero-data calibration items: determinism, per-rank sharding, caching, shuffling."""

from types import SimpleNamespace

import pytest
import torch

from vq4dit.data import CalibrationDataModule, ShuffledBatches, generate_items, trajectory_plan
from vq4dit.models import load_dit
from vq4dit.sampling import SamplerConfig


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return load_dit("tiny")


def fake_trainer(teacher, rank=0, world=1, epoch=0):
    module = SimpleNamespace(teacher=teacher, hparams={"model": "tiny"})
    return SimpleNamespace(lightning_module=module, global_rank=rank, world_size=world, current_epoch=epoch,
                           strategy=SimpleNamespace(root_device=torch.device("cpu")))


def setup_datamodule(teacher, rank=0, world=1, **kwargs):
    data = CalibrationDataModule(num_steps=4, num_classes=10, val_trajectories=1, **kwargs)
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
    items = generate_items(teacher, [0, 1], 0, 2, 10, config, progress=False)
    assert items["x"].shape == (2 * 2 * 4, 4, 8, 8)
    # timesteps run from noisy to clean within each trajectory, as in sampling
    assert items["t"][:2].tolist() == [999, 999] and items["t"][-2:].tolist() == [0, 0]
    again = generate_items(teacher, [0, 1], 0, 2, 10, config, progress=False)
    assert all(torch.equal(items[k], again[k]) for k in items)
    # a trajectory does not depend on which others are generated with it
    # (items are step-major: [steps, samples]; trajectory 1 = samples 2 and 3)
    alone = generate_items(teacher, [1], 0, 2, 10, config, progress=False)
    together = items["x"].reshape(4, 4, -1)[:, 2:]
    assert torch.allclose(together, alone["x"].reshape(4, 2, -1), atol=1e-5)
    assert not torch.allclose(items["x"].reshape(4, 4, -1)[:, :2], together, atol=1e-3)


def test_ranks_get_disjoint_complete_shards(teacher):
    single = setup_datamodule(teacher, num_trajectories=4, classes_per_trajectory=2)
    shards = [setup_datamodule(teacher, rank=r, world=2, num_trajectories=4, classes_per_trajectory=2) for r in (0, 1)]
    key = lambda items: {(tuple(x.flatten()[:4].tolist()), int(t)) for x, t in zip(items["x"], items["t"])}  # noqa: E731
    a, b = key(shards[0].train_items), key(shards[1].train_items)
    assert not a & b  # none duplicated
    assert a | b == key(single.train_items)  # none dropped
    with pytest.raises(ValueError, match="divisible"):
        setup_datamodule(teacher, rank=0, world=3, num_trajectories=4)


def test_cache_round_trip(teacher, tmp_path):
    first = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("trajectories-*.safetensors"))
    assert len(files) == 2  # train + val
    second = setup_datamodule(teacher, num_trajectories=2, cache_dir=str(tmp_path))
    assert all(torch.equal(first.train_items[k], second.train_items[k]) for k in first.train_items)


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
    import vq4dit.data as data_module

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

