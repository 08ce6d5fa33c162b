"""Faults on the save / load path of packed models, for real: every writer killed with SIGKILL at
random points, NaN models and read-only targets on every writer, a file whose header lies about
its size."""

import contextlib
import json
import os
import random
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import safetensors
import torch
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

import vq4dit
from tests.test_diffusers_backend import CONFIG, WEIGHTS, tiny_vae
from tests.test_export import quantized_dit
from vq4dit.atomic import WriteError
from vq4dit.io import QuantizedCheckpointError, load_quantized, save_quantized

ROOT = Path(__file__).parents[1]


def checksum(folder: Path) -> str:
    with safetensors.safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        return handle.metadata()["vq4dit_sha256"]


def pipeline(model):
    return DiTPipeline(transformer=model, vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=None)


# The writers, as a user calls them; each writes `model` (a pipeline's transformer for "pipe") to `folder`.
WRITERS = {
    "save_quantized": lambda model, folder: save_quantized(model, folder, overwrite=True),
    "vq4dit.save_pretrained(pipe)": lambda model, folder: vq4dit.save_pretrained(pipeline(model), folder, overwrite=True),
    "model.save_pretrained": lambda model, folder: model.save_pretrained(folder),
    "pipe.save_pretrained": lambda model, folder: pipeline(model).save_pretrained(folder),
}


def model_folder(folder: Path, writer: str) -> Path:
    return folder / "transformer" if "pipe" in writer else folder


# ----------------------------------------------------------------------------- same guards


@pytest.mark.parametrize("writer", [*WRITERS, "model.push_to_hub"])
def test_a_nan_codebook_is_refused_by_every_writer_before_anything_is_written(writer, tmp_path, monkeypatch):
    model = quantized_dit(CONFIG)
    with torch.no_grad():
        model.transformer_blocks[1].attn1.to_v.codebook[0, 0] = float("nan")
    uploads = []
    import diffusers.utils.hub_utils

    # diffusers' push_to_hub creates the repo before it saves (its order); nothing may be uploaded
    monkeypatch.setattr(diffusers.utils.hub_utils, "create_repo", lambda repo_id, **kw: type("R", (), {"repo_id": repo_id}))
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", lambda *a, **kw: uploads.append(kw))
    run = (lambda m, f: m.push_to_hub("org/nan")) if writer == "model.push_to_hub" else WRITERS[writer]
    with pytest.raises(QuantizedCheckpointError, match=r"NaN/Inf values in 1 tensor\(s\): transformer_blocks.1.attn1.to_v.codebook"):
        run(model, tmp_path / "out")
    assert os.listdir(tmp_path) == [] and not uploads


@contextlib.contextmanager
def mounted_tmpfs(target: Path, options: str, what: str) -> Iterator[Path]:
    """Create the folder ``target``, mount a tmpfs with ``options`` on it for the ``with`` block,
    then unmount it; skips the test (naming ``what``) where a tmpfs cannot be mounted."""
    target.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount {what} here: {done.stderr.decode().strip()}")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture()
def read_only_dir(tmp_path):
    with mounted_tmpfs(tmp_path / "ro", "ro,size=1m", "a read-only tmpfs") as target:
        yield target


def test_a_read_only_target_is_one_clear_error(read_only_dir):
    model = quantized_dit(CONFIG)
    messages = set()
    for writer in ("save_quantized", "vq4dit.save_pretrained(pipe)"):
        with pytest.raises(WriteError) as caught:
            WRITERS[writer](model, read_only_dir / "out")
        messages.add(str(caught.value).replace(str(read_only_dir), "DIR"))
    assert messages == {"cannot write DIR/out: Read-only file system"}
    # diffusers' own save_pretrained writes in place and raises what the OS says; no hook sees the folder
    with pytest.raises(OSError, match="Read-only file system"):
        model.save_pretrained(read_only_dir / "out")
    assert os.listdir(read_only_dir) == []


# --------------------------------------------------------------------------- a lying file


def lie_about_size(file: Path, extra_bytes: int) -> None:
    """Add a tensor of ``extra_bytes`` to the header and extend the file sparsely to match."""
    raw = file.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + length])
    end = max(info["data_offsets"][1] for name, info in header.items() if name != "__metadata__")
    header["evil"] = {"dtype": "F32", "shape": [extra_bytes // 4], "data_offsets": [end, end + extra_bytes]}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(file, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)) + text + raw[8 + length:])
        handle.truncate(8 + len(text) + end + extra_bytes)  # sparse: a few KiB on disk


def test_a_header_claiming_3_gib_more_is_refused_before_reading(tmp_path):
    folder = save_quantized(quantized_dit(CONFIG), tmp_path / "liar")
    lie_about_size(folder / WEIGHTS, 3 * 1024**3)
    assert os.stat(folder / WEIGHTS).st_blocks * 512 < 10 * 1024**2
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    started = time.perf_counter()
    with pytest.raises(QuantizedCheckpointError, match=r"does not match config.json .*unexpected keys: \[evil\]"):
        load_quantized(folder)
    with pytest.raises(QuantizedCheckpointError, match=r"unexpected keys: \[evil\]"):
        DiTTransformer2DModel.from_pretrained(folder)  # diffusers maps the file first; nothing is read
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 512 * 1024
    assert time.perf_counter() - started < 30


# ------------------------------------------------------------------------------ kill -9

WORKER = r"""
import os, sys, torch
sys.path.insert(0, os.getcwd())
from tests.test_io_trust import WRITERS, two_models

models = two_models()
print("ready", flush=True)
for line in sys.stdin:  # "writer<TAB>folder": one child per kill, saving both models in turn until killed
    writer, folder = line.rstrip("\n").split("\t")
    pid = os.fork()
    if pid == 0:
        i = 0
        while True:
            WRITERS[writer](models[i % 2], folder)
            i += 1
    print(pid, flush=True)
    os.waitpid(pid, 0)
"""


def two_models():
    """Two packed models of the same architecture and other weights."""
    models = [quantized_dit(CONFIG), quantized_dit(CONFIG)]
    with torch.no_grad():
        models[1].proj_out_2.bias.add_(1)
    return models


@pytest.fixture(scope="module")
def worker():
    """One process (imports paid once) that forks a saving child per kill."""
    process = subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, text=True, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert process.stdout.readline().strip() == "ready"
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize("writer", list(WRITERS))
def test_every_writer_under_kill_9(writer, worker, tmp_path):
    """SIGKILL at random points of repeated saves over an existing folder: the folder is always the
    old or the new model for vq4dit's (atomic) writers; for diffusers' own (in place) writers it is
    one of them or loading gives one clear error, never a mix."""
    folder, kills, models = tmp_path / "target", 10, two_models()
    expected = set()
    for model in models:
        WRITERS[writer](model, folder)
        expected.add(checksum(model_folder(folder, writer)))
    rng, outcomes = random.Random(writer), []
    for _ in range(kills):
        worker.stdin.write(f"{writer}\t{folder}\n")
        worker.stdin.flush()
        pid = int(worker.stdout.readline())
        time.sleep(rng.uniform(0.02, 0.4))
        os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)
        try:
            load_quantized(model_folder(folder, writer))
            outcomes.append("old/new" if checksum(model_folder(folder, writer)) in expected else "OTHER")
        except QuantizedCheckpointError as err:
            assert len(str(err).splitlines()) == 1
            outcomes.append("error")
    print(writer, {o: outcomes.count(o) for o in set(outcomes)})
    assert "OTHER" not in outcomes, outcomes  # never an unknown model
    if writer in ("save_quantized", "vq4dit.save_pretrained(pipe)"):
        assert outcomes == ["old/new"] * kills  # atomic: always a complete model


def test_a_full_disk_is_one_clear_error_and_leaves_nothing(tmp_path):
    with mounted_tmpfs(tmp_path / "small", "size=64k", "a small tmpfs") as target:
        for writer in ("save_quantized", "vq4dit.save_pretrained(pipe)"):
            with pytest.raises(WriteError, match=r"^cannot write .*/small/out: (?i:no space left on device)"):
                WRITERS[writer](quantized_dit(CONFIG), target / "out")
            assert os.listdir(target) == []
