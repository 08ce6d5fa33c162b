"""Atomic writes of files and folders, and recovery from interrupted ones.

Every write goes to a hidden temporary sibling of the target in the same folder
(``.NAME.tmp-HOST-PID-RANDOM``), is fsynced, then renamed onto the target, so a reader sees the
old content or the new one, never a mix. Environment faults (disk full, no permission, a parent
that is a file, ...) become one :class:`WriteError` whose one-line message names the path and
the cause; the temporary is removed and the target left untouched. The libraries' own write
failures count too (safetensors' ``SafetensorError`` with an OS error, torch.save's
``RuntimeError: [enforce fail at inline_container.cc...]``, which names no cause: a probe write
finds it), and where the caller knows the size to write, the free space and the file size limit
(``ulimit -f``) are checked before anything is written. What is written follows the umask, as
any file the user writes does (files ``0666 & ~umask``, folders ``0777 & ~umask``).

Folder replacement (:func:`atomic_folder` with ``overwrite=True``) swaps the new folder and the
old one with ``renameat2(RENAME_EXCHANGE)`` where the OS and file system allow (Linux >= 3.15,
ext4/xfs/btrfs/tmpfs, ...): a complete folder is at the path at every instant, even under
SIGKILL or power loss. Elsewhere it falls back to two renames (target -> ``.NAME.old-...``, new
-> target; an exception between them renames the old one back): only a kill between the two
renames leaves the path missing, and :func:`recover` (run by every later :func:`atomic_folder`
on the same path, and by ``vq4dit.load_quantized``) renames the old folder back.

Leftovers are removed only when stale: written by a process of this host that no longer runs,
or (another host, an unknown writer, a reused pid) untouched for :data:`STALE_AFTER_S` seconds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .write_faults import WriteError, follow_umask, library_write_error, os_reason, check_room

__all__ = [
    "STALE_AFTER_S", "WriteError", "atomic_folder", "atomic_path", "atomic_write_bytes",
    "atomic_write_text", "check_room", "recover",
]

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0  # a leftover whose writer cannot be checked is stale after 1 h untouched
_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
_LEFTOVER = re.compile(r"(?:(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-)?[A-Za-z0-9_]+")
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
_AT_FDCWD = -100


def _write_error(path: Path, err: OSError) -> WriteError:
    return WriteError(f"cannot write {path}: {os_reason(err)}")


def _prepare_parent(path: Path) -> None:
    """Create the parent folders of ``path``; name the ancestor that is a file if there is one."""
    for ancestor in path.parents:
        if ancestor.exists():
            if not ancestor.is_dir():
                raise WriteError(f"cannot write {path}: {ancestor} is not a directory")
            break
    path.parent.mkdir(parents=True, exist_ok=True)


def _temp_name(path: Path, kind: str) -> str:
    return f".{path.name}.{kind}-{_HOST}-{os.getpid()}-"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # not every platform fsyncs directories
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        for name in files:
            _fsync(Path(root) / name)
        _fsync(Path(root))


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the OS or file system does not offer it."""
    func = getattr(_libc(), "renameat2", None)
    if func is None:
        return False
    if func(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(dst))


_LIBC: list = []


def _libc():
    if not _LIBC:
        try:
            _LIBC.append(ctypes.CDLL(None, use_errno=True))
        except (OSError, TypeError):  # no C library to load by that name (Windows, ...)
            _LIBC.append(None)
    return _LIBC[0]


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary path for the caller to write a file to; when the block ends without error
    it is fsynced, given the umask's mode and ``os.replace``d onto ``path``, otherwise removed.
    The temporary path is ``path``'s name inside a private folder ``.NAME.tmp-HOST-PID-RANDOM``
    next to ``path``: whatever a library writes beside it (safetensors 0.8 writes its own
    ``.tmpXXXXXX`` file and renames it) stays in that folder, which a kill leaves for
    :func:`recover` to delete. ``size``: the bytes about to be written, checked against the free
    space and the file size limit first (:func:`check_room`).

    Raises :class:`WriteError` for environment faults (``OSError``, or a library's write failure),
    in the block or after it.
    """
    path = Path(path).absolute()
    private = path.parent / (_temp_name(path, "tmp") + secrets.token_hex(4))
    tmp = private / path.name
    try:
        _prepare_parent(path)
        if size is not None:
            check_room(path, size)
        private.mkdir()
        yield tmp
        if not tmp.is_file():
            raise WriteError(f"cannot write {path}: nothing was written to the temporary file")
        follow_umask(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    except Exception as err:  # noqa: BLE001  (a library's write failure; anything else passes through)
        cause = None if isinstance(err, ValueError) else library_write_error(err, tmp)
        if cause is None:
            raise
        raise _write_error(path, cause) from err
    finally:
        with contextlib.suppress(OSError):
            _remove(private)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to the file ``path`` atomically (see :func:`atomic_path`); returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as handle:
            handle.write(data)
    return Path(path).absolute()


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to the file ``path`` atomically (see :func:`atomic_path`); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


# ---------------------------------------------------------------------------------------------
# Folders
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_folder(
    path: str | os.PathLike, *, overwrite: bool = False, validate: Callable[[Path], None] | None = None,
    size: int | None = None,
) -> Iterator[Path]:
    """Yield a new empty hidden folder next to ``path`` to fill; when the block ends without error
    its files and itself are fsynced and it takes the place of ``path``.

    Args:
        path: the folder to create or replace.
        overwrite: replace an existing ``path`` (its old content is deleted afterwards).
        validate: called with ``path`` just before the swap (it may have appeared meanwhile);
            raise to refuse replacing what is there.
        size: the bytes about to be written in all, checked first (:func:`check_room`).

    Stale leftovers of interrupted writes of ``path`` are recovered first (:func:`recover`).
    Raises :class:`WriteError` for environment faults; the target is then untouched and the
    temporary folder removed.
    """
    path = Path(path).absolute()
    tmp = None
    try:
        _prepare_parent(path)
        recover(path)
        if size is not None:
            check_room(path, size)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_name(path, "tmp"), dir=path.parent))
        yield tmp
        follow_umask(tmp)
        _fsync_tree(tmp)
        if validate is not None:
            validate(path)
        if path.exists() or path.is_symlink():
            if not overwrite:
                raise WriteError(f"cannot write {path}: it already exists")
            _replace_folder(tmp, path)
        elif not _renameat2(tmp, path, _RENAME_NOREPLACE):
            os.rename(tmp, path)
        _fsync(path.parent)
    except OSError as err:
        raise _write_error(path, err) from err
    except Exception as err:  # noqa: BLE001  (a library's write failure; anything else passes through)
        cause = None if isinstance(err, ValueError) or tmp is None else library_write_error(err, _newest_file(tmp))
        if cause is None:
            raise
        raise _write_error(path, cause) from err
    finally:
        if tmp is not None:
            _remove(tmp)  # after a swap: the old content; after a failure: the partial new one


def _newest_file(folder: Path) -> Path:
    """The file written last in ``folder`` (the one a failed write was writing), else a new name."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime_ns) if files else folder / ".probe"


def _replace_folder(new: Path, path: Path) -> None:
    """Put ``new`` at ``path`` (which exists); the old content ends up at ``new``."""
    if _renameat2(new, path, _RENAME_EXCHANGE):
        return
    old = path.parent / (_temp_name(path, "old") + secrets.token_hex(4))
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)  # interrupted between the two renames: put the old one back
        raise
    try:
        os.rename(old, new)  # removed with the temporary folder
    except OSError:  # the new folder is in place: the old one is only garbage now
        _remove(old)


# ---------------------------------------------------------------------------------------------
# Recovery
# ---------------------------------------------------------------------------------------------


def _writer_alive(host: str | None, pid: str | None) -> bool | None:
    """Whether the writer of a leftover still runs; None when that cannot be known."""
    if host != _HOST or pid is None:
        return None
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):  # another user's process; odd numbers
        return True
    return True


def _last_touched(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir() and not path.is_symlink():
        times += [child.lstat().st_mtime for child in path.iterdir()]
    return max(times)


def _stale_leftovers(path: Path, now: float) -> tuple[list[Path], list[Path]]:
    """Stale ``(old folders, temporaries)`` that interrupted writes of ``path`` left behind."""
    olds, temps = [], []
    for kind, found in (("old", olds), ("tmp", temps)):
        prefix = f".{path.name}.{kind}-"
        for entry in os.scandir(path.parent):
            match = entry.name.startswith(prefix) and _LEFTOVER.fullmatch(entry.name[len(prefix):])
            if not match:
                continue
            entry = Path(entry.path)
            try:
                alive = _writer_alive(match["host"], match["pid"])
                if alive is False or (alive is None and now - _last_touched(entry) > STALE_AFTER_S):
                    found.append(entry)
            except OSError:  # vanished meanwhile
                continue
    return olds, temps


def recover(path: str | os.PathLike) -> bool:
    """Repair what interrupted writes of the file or folder ``path`` left (by :func:`atomic_path`
    and :func:`atomic_folder`): if ``path`` is missing and a stale
    ``.NAME.old-*`` folder exists (killed between the two renames of an overwrite), rename the
    newest back to ``path``; then delete stale ``.NAME.tmp-*`` / ``.NAME.old-*`` leftovers.
    Leftovers of writers that may still run are not touched. Returns True when ``path`` was
    restored. Raises ``OSError`` only when the restoring rename fails.
    """
    path = Path(path).absolute()
    if not path.parent.is_dir():
        return False
    olds, temps = _stale_leftovers(path, time.time())
    restored = False
    if olds and not (path.exists() or path.is_symlink()):
        newest = max(olds, key=lambda p: p.lstat().st_ctime)
        try:
            os.rename(newest, path)
            restored = True
            olds.remove(newest)
            log.warning("restored %s from %s, left by an interrupted overwrite", path, newest.name)
        except FileNotFoundError:  # another process restored it first
            pass
        except OSError as err:
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    for leftover in olds + temps:
        _remove(leftover)
        log.info("removed %s, left by an interrupted write", leftover)
    return restored
