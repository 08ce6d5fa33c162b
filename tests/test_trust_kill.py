"""Every writer atomic under a real ``kill -9`` (issue 20): a subprocess rewrites a packed model
(``save_quantized``), a trajectory cache file and a checkpoint over and over, each version
numbered; it is killed with SIGKILL at random points. After each kill every target must load and
be one complete version (the one being replaced or the one being written), never a mix or a
truncated file; and the temporaries a kill leaves are removed by the next write (``recover``)."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from vq4dit import load_quantized
from vq4dit.atomic import recover
from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO

KILLS = 6

WRITER = textwrap.dedent("""
    import os, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from vq4dit import VQConfig, load_dit, save_quantized
    from vq4dit.atomic import atomic_path
    from vq4dit.engine import build_student
    from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO
    from vq4dit.quantize import finalize_model_

    root = Path(sys.argv[1])
    torch.manual_seed(0)
    student = build_student(load_dit("tiny"), VQConfig(codebook_size=16, subvector_dim=2), progress=False)
    finalize_model_(student)
    bias = student.transformer_blocks[0].ff.net[2].bias
    big = torch.zeros(1 << 18)  # 1 MiB per file: long enough writes to be killed in the middle


    def write_forever(version):
        while True:
            version += 1
            os.write(1, f"writing {version}\\n".encode())  # one write: the previous version is complete
            with torch.no_grad():
                bias.fill_(version)
            save_quantized(student, root / "packed", overwrite=True, card={"version": version})
            with atomic_path(root / "cache.safetensors") as tmp:
                save_file({"x": big + version}, str(tmp))
            AtomicCheckpointIO().save_checkpoint({"version": version, "w": big + version}, root / "last.ckpt")


    for line in sys.stdin:  # "VERSION": fork a writer starting after VERSION (the model is built once)
        pid = os.fork()
        if pid == 0:
            write_forever(int(line))
        os.write(1, f"pid {pid}\\n".encode())
        os.waitpid(pid, 0)
        os.write(1, b"reaped\\n")
""")


def versions_on_disk(root: Path) -> dict[str, int]:
    """The version of every target; each must be complete and consistent in itself."""
    model = load_quantized(root / "packed")  # verifies the checksum over all tensors
    config = json.loads((root / "packed" / "config.json").read_text())
    packed = int(config["quantization_config"]["card"]["version"])
    assert torch.all(model.transformer_blocks[0].ff.net[2].bias == packed)  # config and weights agree
    cache = load_file(str(root / "cache.safetensors"))["x"]
    checkpoint = AtomicCheckpointIO().load_checkpoint(root / "last.ckpt")
    assert torch.all(cache == cache[0]) and torch.all(checkpoint["w"] == checkpoint["version"])
    return {"packed": packed, "cache": int(cache[0]), "checkpoint": int(checkpoint["version"])}


def test_every_writer_survives_kill_9_at_random_points(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}
    server = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    rng, version, kills_mid_write = random.Random(20), 0, 0
    try:
        for _ in range(KILLS):
            server.stdin.write(f"{version}\n")
            server.stdin.flush()
            writer, started = None, []  # the writer's and the server's lines come in either order
            while writer is None or len(started) < (2 if version == 0 else 1):  # 0: a first complete version
                tag, number = server.stdout.readline().split()
                writer, started = (int(number), started) if tag == "pid" else (writer, [*started, int(number)])
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(writer, signal.SIGKILL)  # a real SIGKILL: no cleanup runs in the writer
            for line in iter(server.stdout.readline, "reaped\n"):
                started.append(int(line.split()[1]))
            last = started[-1]  # being written when killed; last - 1 was complete
            found = versions_on_disk(tmp_path)
            assert all(v in (last - 1, last) for v in found.values()), (found, started)
            kills_mid_write += any(v == last - 1 for v in found.values())
            version = last - 1  # the next writer writes version ``last`` again, all targets
    finally:
        server.kill()
        server.wait()
    assert kills_mid_write >= 1  # some kills really hit a write in progress
    for target in ("packed", "cache.safetensors", "last.ckpt"):
        recover(tmp_path / target)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
