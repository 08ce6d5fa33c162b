"""A real full disk (issue 20): a 1 MB tmpfs (we are root; skipped with the reason where mounting
is refused), ``RLIMIT_FSIZE`` in a subprocess with SIGXFSZ ignored, and injection. Every writer
ends in one ``WriteError`` / ``error:`` line naming the cause, keeps what was there, leaves no
temporary; and what it writes follows the umask."""

import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.test_trust import earlier_export, error_lines, run_main
from tests.test_calibration import fit_args
from vq4dit import write_faults
from vq4dit.atomic import WriteError, atomic_folder, atomic_path
from vq4dit.lightning.checkpoint_io import AtomicCheckpointIO

HALF_MB = {"w": torch.ones(128 * 1024)}  # 512 KiB of float32


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), unmounted afterwards."""
    folder = tmp_path / "small_disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


WRITERS = {
    "safetensors": lambda path: save_file(HALF_MB, str(path)),
    "torch.save": lambda path: torch.save(HALF_MB, path),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_what_the_libraries_raise_on_a_full_disk_is_one_write_error(small_disk, writer):
    target = small_disk / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as info:  # no size given: the write itself fails
        with atomic_path(target) as tmp:
            WRITERS[writer](tmp)
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert target.read_bytes() == b"old" and not leftovers(small_disk)
    with pytest.raises(WriteError, match="No space left on device"):  # the same inside a folder
        with atomic_folder(small_disk / "folder") as tmp:
            WRITERS[writer](tmp / "weights")
    assert sorted(p.name for p in small_disk.iterdir()) == ["out.bin"]


def test_a_size_known_in_advance_is_refused_before_writing(small_disk):
    with pytest.raises(WriteError, match=r"no space left on device \(needs 512\.0 KiB|no space left on device \(needs"):
        with atomic_path(small_disk / "out.bin", size=512 * 1024) as tmp:
            raise AssertionError(f"{tmp} must not be written")
    assert not list(small_disk.iterdir())


FSIZE_CHILD = textwrap.dedent("""
    import resource, signal, sys, torch
    from safetensors.torch import save_file
    from vq4dit.atomic import WriteError, atomic_path
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
    tensors = {"w": torch.ones(128 * 1024)}
    for name, write in [("a.safetensors", lambda p: save_file(tensors, str(p))), ("b.pt", lambda p: torch.save(tensors, p)),
                        ("c.pt", None)]:
        try:
            with atomic_path(sys.argv[1] + "/" + name, size=None if write else 512 * 1024) as tmp:
                write(tmp)
        except WriteError as error:
            print(error)
""")


def test_file_size_limit_in_a_subprocess_is_named(tmp_path):
    out = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path.cwd())}, timeout=120)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert len(lines) == 3, out.stdout
    assert all("File too large (the file size limit, ulimit -f)" in line for line in lines[:2]), lines
    assert "exceed the file size limit" in lines[2], lines
    assert list(tmp_path.iterdir()) == []


def test_export_refused_before_writing_when_the_disk_is_too_small(tmp_path, monkeypatch):
    """Injection (no mount needed): the file system reports 100 KB free."""
    before = earlier_export(tmp_path / "packed")
    real = os.statvfs

    def small(path):
        stats = real(path)
        return os.statvfs_result((stats.f_bsize, 1024, stats.f_blocks, 100, 100, *tuple(stats)[5:]))

    monkeypatch.setattr(write_faults.os, "statvfs", small)
    with pytest.raises(WriteError, match="no space left on device"):
        earlier_export(tmp_path / "packed_again")
    assert {p.name: p.read_bytes() for p in (tmp_path / "packed").iterdir()} == before
    assert not (tmp_path / "packed_again").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["export", "checkpoint", "cache"])
def test_full_disk_at_the_command_line_is_one_error_line(tmp_path, small_disk, monkeypatch, capsys, where):
    target = {"export": f"--model.export.dir={small_disk / 'packed'}",
              "checkpoint": f"--trainer.logger.init_args.save_dir={small_disk}",
              "cache": f"--data.cache_dir={small_disk / 'cache'}"}[where]
    args = fit_args(tmp_path, "--trainer.max_epochs=1", "--model.allocation.enabled=false", target)
    if where == "cache":  # the cache files (about 100 KB) would fit: fill the disk first
        (small_disk / "filler").write_bytes(bytes(220 * 1024))
    if where == "export":
        args += ["--trainer.enable_checkpointing=false", "--trainer.callbacks=[]"]
    code, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    (line,) = error_lines(err)
    assert "no space left on device" in line.lower() and str(small_disk) in line, line
    assert {"export": "packed", "checkpoint": ".ckpt", "cache": "trajectories-"}[where] in line, line
    assert not leftovers(small_disk) and not (small_disk / "packed").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_what_is_written_follows_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        earlier_export(tmp_path / "packed")
        AtomicCheckpointIO().save_checkpoint({"w": torch.ones(3)}, tmp_path / "ckpt" / "last.ckpt")
        with atomic_path(tmp_path / "cache" / "trajectories.safetensors") as tmp:
            save_file(HALF_MB, str(tmp))  # as the trajectory cache writes (safetensors makes 0600 files)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*")}
    for name, mode in modes.items():
        want = (0o777 if (tmp_path / name).is_dir() else 0o666) & ~umask
        assert mode == want, f"{name}: {oct(mode)}, umask {oct(umask)} wants {oct(want)}"
    assert {"packed", "packed/diffusion_pytorch_model.safetensors", "packed/config.json", "ckpt/last.ckpt"} <= modes.keys()
