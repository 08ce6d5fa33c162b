"""vq4dit.atomic: atomic file/folder writes, one-line WriteError for environment faults, recovery."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vq4dit import atomic
from vq4dit.atomic import WriteError, atomic_folder, atomic_path, atomic_write_bytes, atomic_write_text, recover

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def dead_pid() -> int:
    """The pid of a process of this host that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def leftover(parent: Path, name: str, kind: str, pid: int | None, host: str = atomic._HOST) -> Path:
    """A folder as an interrupted write of ``parent/name`` leaves it (``pid=None``: legacy name)."""
    tag = f"{host}-{pid}-ab12cd34" if pid is not None else "ab12cd34"
    folder = parent / f".{name}.{kind}-{tag}"
    folder.mkdir()
    (folder / "config.json").write_text(f"{kind} {pid}")
    return folder


def age(path: Path, seconds: float) -> None:
    stamp = time.time() - seconds
    for item in [path, *path.iterdir()] if path.is_dir() else [path]:
        os.utime(item, (stamp, stamp))


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ----------------------------------------------------------------------------------------- files


def test_atomic_write_creates_and_replaces(tmp_path):
    target = atomic_write_text(tmp_path / "sub" / "a.json", "{}\n")
    assert target == tmp_path / "sub" / "a.json" and target.read_text() == "{}\n"
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and listing(target.parent) == ["a.json"]


@pytest.mark.parametrize("where", ["write", "fsync", "replace"])
def test_disk_full_leaves_the_target_untouched(tmp_path, monkeypatch, where):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def fail(*args, **kwargs):
        raise ENOSPC

    if where == "fsync":
        monkeypatch.setattr(os, "fsync", fail)
    elif where == "replace":
        monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(WriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            if where == "write":
                fail()
    assert str(info.value) == f"cannot write {target}: No space left on device"
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    assert target.read_text() == "old" and listing(tmp_path) == ["a.txt"]


def test_parent_that_is_a_file_and_permission_errors(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(WriteError, match=r"^cannot write \S+/file/sub/a: \S+/file is not a directory$"):
        atomic_write_text(tmp_path / "file" / "sub" / "a", "y")

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(WriteError, match=r"^cannot write \S+/new/a: Permission denied$"):
        atomic_write_text(tmp_path / "new" / "a", "y")


def test_interrupt_removes_the_temporary_and_passes_through(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "a") as tmp:
            tmp.write_text("partial")
            raise KeyboardInterrupt
    with pytest.raises(WriteError, match="nothing was written"):
        with atomic_path(tmp_path / "a"):
            pass
    assert listing(tmp_path) == []


# --------------------------------------------------------------------------------------- folders


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_folder_create_and_replace(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_renameat2", lambda src, dst, flags: False)
    target = tmp_path / "ckpt"
    with atomic_folder(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(WriteError, match="already exists"):
        with atomic_folder(target) as tmp:
            (tmp / "a").write_text("2")
    with atomic_folder(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert listing(target) == ["b"] and listing(tmp_path) == ["ckpt"]


def test_folder_disk_full_and_refused_replace(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "a").write_text("old")
    real_fsync = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise ENOSPC
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(WriteError, match=f"^cannot write {target}: No space left on device$"):
        with atomic_folder(target, overwrite=True) as tmp:
            (tmp / "a").write_text("new")
            (tmp / "b").write_text("new")
    monkeypatch.setattr(os, "fsync", real_fsync)

    def refuse(path):
        raise ValueError(f"{path} is not mine")

    with pytest.raises(ValueError, match="not mine"):
        with atomic_folder(target, overwrite=True, validate=refuse) as tmp:
            (tmp / "a").write_text("new")
    assert listing(tmp_path) == ["ckpt"] and (target / "a").read_text() == "old"


# -------------------------------------------------------------------------------------- recovery


def test_recover_restores_a_target_lost_between_two_renames(tmp_path):
    pid = dead_pid()
    old = leftover(tmp_path, "ckpt", "old", pid)
    leftover(tmp_path, "ckpt", "tmp", pid)  # the new folder, not yet renamed in
    assert recover(tmp_path / "ckpt") is True
    assert listing(tmp_path) == ["ckpt"] and (tmp_path / "ckpt" / "config.json").read_text() == f"old {pid}"
    assert not old.exists() and recover(tmp_path / "ckpt") is False


def test_recover_removes_only_stale_leftovers(tmp_path):
    (tmp_path / "ckpt").mkdir()
    dead = dead_pid()
    stale = [leftover(tmp_path, "ckpt", "tmp", dead), leftover(tmp_path, "ckpt", "old", dead)]
    live = [leftover(tmp_path, "ckpt", "tmp", os.getpid()), leftover(tmp_path, "ckpt", "old", os.getppid())]
    legacy_new, legacy_old = leftover(tmp_path, "ckpt", "tmp", None), leftover(tmp_path, "ckpt", "old", None)
    elsewhere = leftover(tmp_path, "ckpt", "tmp", dead, host="0badc0de")  # another host: pid unknown
    other = [tmp_path / ".ckpt.tmp-not-ours-either", tmp_path / ".other.tmp-ab12cd34", tmp_path / "ckpt.tmp-1"]
    for path in other:
        path.mkdir()
        age(path, 10 * atomic.STALE_AFTER_S)
    age(legacy_old, 2 * atomic.STALE_AFTER_S)
    assert recover(tmp_path / "ckpt") is False  # the target exists: nothing to restore
    assert not any(p.exists() for p in stale + [legacy_old])
    assert all(p.exists() for p in live + [legacy_new, elsewhere] + other)
    age(elsewhere, 2 * atomic.STALE_AFTER_S)
    recover(tmp_path / "ckpt")
    assert not elsewhere.exists()


def test_recover_leaves_a_live_writers_swap_alone(tmp_path):
    leftover(tmp_path, "ckpt", "old", os.getpid())  # this process is between the two renames
    assert recover(tmp_path / "ckpt") is False and listing(tmp_path) == [f".ckpt.old-{atomic._HOST}-{os.getpid()}-ab12cd34"]


def test_atomic_folder_recovers_before_writing(tmp_path):
    pid = dead_pid()
    leftover(tmp_path, "ckpt", "old", pid)
    leftover(tmp_path, "ckpt", "tmp", pid)
    with pytest.raises(WriteError, match="already exists"):  # the restored old one is kept
        with atomic_folder(tmp_path / "ckpt") as tmp:
            (tmp / "x").write_text("new")
    assert listing(tmp_path) == ["ckpt"] and listing(tmp_path / "ckpt") == ["config.json"]


def test_what_a_library_writes_beside_the_temporary_file_never_lands_in_the_target_folder(tmp_path):
    """safetensors 0.8 writes its own ``.tmpXXXXXX`` next to the file it is given, then renames it:
    that happens inside atomic_path's private folder, which success removes and a real kill -9
    leaves for ``recover``."""
    import signal

    with atomic_path(tmp_path / "a.safetensors") as tmp:
        (tmp.parent / ".tmpAbC123").write_bytes(b"a library's own temporary")
        tmp.write_bytes(b"done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    script = ("import os, signal, sys\nfrom vq4dit.atomic import atomic_path\n"
              "with atomic_path(sys.argv[1]) as tmp:\n"
              "    (tmp.parent / '.tmpXyZ789').write_bytes(b'half')\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b.safetensors")], timeout=120)
    assert result.returncode == -signal.SIGKILL
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".b.safetensors.tmp-")]) == 1  # all in one folder
    recover(tmp_path / "b.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
