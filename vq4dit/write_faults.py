"""What goes wrong when writing, found before or named after: free space and the file size limit
checked before a write of known size, the cause behind a library's own write failure, and the
umask's file modes (the pieces :mod:`vq4dit.atomic` builds on)."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
from pathlib import Path

__all__ = ["WriteError", "check_room", "follow_umask", "library_write_error", "os_reason"]


class WriteError(ValueError):
    """A file or folder cannot be written; the message says which and why, in one line."""


def os_reason(err: OSError) -> str:
    reason = err.strerror or str(err) or type(err).__name__
    if err.errno == errno.EFBIG:
        reason += " (the file size limit, ulimit -f)"
    return reason


_OS_ERROR = re.compile(r"os error (\d+)")
_TORCH_WRITE = ("inline_container.cc", "PytorchStreamWriter", "file write failed")


def library_write_error(err: Exception, written: Path) -> OSError | None:
    """The ``OSError`` behind a library's own write failure, None for any other exception.

    safetensors raises ``SafetensorError("... I/O error: No space left on device (os error 28)")``;
    torch.save raises ``RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos
    ...")`` without the cause, so one more write to ``written`` (or next to it) finds the cause.
    """
    message = str(err)
    if type(err).__name__ == "SafetensorError":
        found = _OS_ERROR.search(message)
        return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None
    if not (isinstance(err, RuntimeError) and any(mark in message for mark in _TORCH_WRITE)):
        return None
    probe = written if written.is_file() else written.with_name(written.name + ".probe")
    try:
        with open(probe, "ab") as handle:
            handle.write(bytes(1 << 16))
            handle.flush()
            os.fsync(handle.fileno())
    except OSError as cause:
        return cause
    finally:
        if probe != written:
            with contextlib.suppress(OSError):
                probe.unlink()
    return OSError(errno.EIO, f"write failed ({message.splitlines()[0][:200]})")


def check_room(path: str | os.PathLike, nbytes: int) -> None:
    """Raise :class:`WriteError` when ``nbytes`` cannot be written next to ``path``: less free space
    on its file system, or over this process's file size limit (``ulimit -f``)."""
    path = Path(path).absolute()
    folder = next((p for p in (path.parent, *path.parents) if p.is_dir()), None)
    if folder is None:
        return
    try:
        stats = os.statvfs(folder)
    except OSError:  # no statvfs here: the write itself will tell
        return
    free = stats.f_bavail * stats.f_frsize
    if nbytes > free:
        raise WriteError(f"cannot write {path}: no space left on device (needs {_size(nbytes)}, "
                         f"{_size(free)} free on {folder})")
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and nbytes > limit:
        raise WriteError(f"cannot write {path}: it would exceed the file size limit (ulimit -f: {_size(limit)}, "
                         f"needs {_size(nbytes)})")


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes} bytes"


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # no /proc: read it by setting it (and putting it back at once)
    os.umask(mask)
    return mask


def follow_umask(path: Path) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes of a plain write under the
    umask; temporary-file helpers and safetensors create 0700 folders and 0600 files."""
    mask = _umask()
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(Path(root) / name, 0o777 & ~mask)
            for name in files:
                os.chmod(Path(root) / name, 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)
