"""Atomic, verified file writes: the one way hqrs_geo writes an output file.

Every writer (tile layers, chips, CSV indexes, datasets, score rasters, caches, checkpoints)
writes to a temporary file in the target's folder, checks what it wrote, flushes it to disk
and then moves it over the target with :func:`os.replace`. So a target is either the old file
or the complete new one: never half written, never a 0-byte file announced as written. On any
failure the temporary file is removed and an :class:`OSError` becomes a one-line
:class:`~hqrs_geo.errors.OutputError` (full disk, read-only file system, permission denied).

:func:`output_folder` does the same for folders a job creates: a folder made by a job that
then fails is removed again when nothing was kept in it.

:func:`folder_lock` makes a read-modify-write of an output (a tile layer merged with new
tiles, a dataset's manifest) one step among processes: an advisory ``flock`` on the output's
folder (no lock file is left behind), held only while the output is read and replaced, so two
jobs writing the same output at once keep each other's results.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

from .errors import HqrsError, OutputError

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]

PathLike = Union[str, "os.PathLike[str]"]

_REASONS = {
    errno.ENOSPC: "no space left on the device; free some space or choose another output",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another output",
    errno.EROFS: "the file system is read-only; choose another output",
    errno.EACCES: "permission denied; choose another output",
    errno.EPERM: "permission denied; choose another output",
    errno.ENOENT: "its folder does not exist; create it or choose another output",
    errno.EFBIG: "the file is larger than the file system or a limit allows; free space or choose another output",
}

#: Messages of libraries (SQLite, GDAL, Arrow) that report a failed write without an errno.
_MESSAGES = (
    ("no space left", errno.ENOSPC), ("disk is full", errno.ENOSPC), ("database or disk is full", errno.ENOSPC),
    ("quota exceeded", errno.EDQUOT), ("read-only file system", errno.EROFS), ("readonly database", errno.EROFS),
    ("read-only database", errno.EROFS), ("permission denied", errno.EACCES), ("file too large", errno.EFBIG),
    ("file size limit exceeded", errno.EFBIG),
    # SQLite rolls a transaction back by itself when the disk fills (SQLITE_FULL, SQLITE_IOERR) and
    # frees its journal; GDAL then reports only that its own ROLLBACK found no transaction
    ("cannot rollback - no transaction is active", errno.ENOSPC), ("disk i/o error", errno.ENOSPC),
)


def write_failure(exc: BaseException) -> int | None:
    """The errno of a failed write behind ``exc`` (full disk, read-only file system, permission
    denied, size limit), also when a library (SQLite, GDAL, Arrow) only says so in its message;
    None for other errors."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None  # GDAL's errors carry an
    if code in _REASONS and code != errno.ENOENT:                               # ``errno`` of their own
        return code
    text = str(exc).lower()
    for fragment, found in _MESSAGES:
        if fragment in text:
            return found
    cause = exc.__cause__ or exc.__context__
    return write_failure(cause) if cause is not None and cause is not exc else None


#: Free bytes below which a failed write is taken for a full disk (GDAL and SQLite often report
#: it only as "I/O error" or as a damaged file).
LOW_SPACE = 1 << 20


def space_left(folder: PathLike) -> int | None:
    """Bytes free for this user in the file system of ``folder`` (None when unknown)."""
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def failure_code(exc: BaseException, folder: PathLike | None = None) -> int | None:
    """:func:`write_failure`, or ENOSPC when the write failed some other way while the file
    system of ``folder`` is (nearly) full; call it before removing what the failed write left."""
    code = write_failure(exc)
    if code is None and folder is not None:
        free = space_left(folder)
        if free is not None and free < LOW_SPACE:
            return errno.ENOSPC
    return code


def output_error(path: PathLike, exc: BaseException, code: int | None = None) -> OutputError:
    """A one-line :class:`OutputError` for a failed write of ``path`` (``code``: the errno
    found by :func:`failure_code`, when already known)."""
    if code is None and isinstance(exc, OSError):
        code = exc.errno
    if code not in _REASONS:
        code = write_failure(exc)
    if code in _REASONS:
        return OutputError(f"{path}: cannot write: {_REASONS[code]}")
    text = str(exc).strip()
    detail = getattr(exc, "strerror", None) or (text.splitlines()[0] if text else type(exc).__name__)
    return OutputError(f"{path}: cannot write ({detail}); check free space and permissions")


def _fsync(path: Path) -> None:
    """Flush a written file to disk (ENOSPC on delayed allocation shows up here)."""
    if path.is_file():
        with open(path, "rb+") as handle:
            os.fsync(handle.fileno())


def check_nonempty(path: Path) -> None:
    """The default check of a written file: it exists and is not empty."""
    if not path.exists():
        raise OSError(errno.EIO, "nothing was written")
    if path.is_file() and path.stat().st_size == 0:
        raise OSError(errno.ENOSPC, "the written file is empty")


@contextmanager
def atomic_path(path: PathLike, copy_existing: bool = False,
                verify: Callable[[Path], None] | None = check_nonempty) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` that replaces it when the block succeeds.

    ``copy_existing``: the temporary file starts as a copy of ``path`` (for in-place updates);
    otherwise it does not exist yet. When the block ends, ``verify(tmp)`` (default: the file is
    not empty) must pass; the file is flushed to disk and moved over ``path``. On any failure
    the temporary file is removed and ``path`` is left as it was; ``OSError`` is raised as a
    one-line :class:`~hqrs_geo.errors.OutputError`.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    remove_stale_temporaries(target)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.{os.getpid()}.", suffix=f".tmp{target.suffix}",
                                    dir=folder)
        os.close(fd)
    except OSError as exc:
        raise output_error(target, exc) from None
    tmp = Path(name)
    try:
        if copy_existing and target.exists():
            shutil.copy2(target, tmp)
        else:
            tmp.unlink()
        yield tmp
        if verify is not None:
            verify(tmp)
        _fsync(tmp)
        os.replace(tmp, target)
    except OSError as exc:
        code = None if isinstance(exc, HqrsError) else failure_code(exc, folder)
        _remove(tmp)
        if isinstance(exc, HqrsError):  # a user error raised inside the block, already worded
            raise
        raise output_error(target, exc, code) from None
    except Exception as exc:  # libraries (SQLite, GDAL, Arrow) report full disks in their own types
        code = None if isinstance(exc, HqrsError) else failure_code(exc, folder)
        _remove(tmp)
        if code is not None:
            raise output_error(target, exc, code) from None
        raise
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temporaries(target: Path) -> int:
    """Remove temporary files of ``target`` left by a process that was killed (SIGKILL, power
    loss) before it could clean up: their names carry the writer's process id, and only those
    of processes no longer running are removed. Returns how many were removed."""
    folder = target.parent if str(target.parent) else Path(".")
    removed = 0
    try:
        # the temporary file itself and what its writer kept beside it (SQLite's -journal, -wal, -shm)
        candidates = list(folder.glob(f".{glob_escape(target.name)}.*.tmp{glob_escape(target.suffix)}*"))
    except OSError:
        return 0
    for candidate in candidates:
        pid_text = candidate.name[len(target.name) + 2:].split(".", 1)[0]
        if not pid_text.isdigit() or _alive(int(pid_text)):
            continue
        _remove(candidate)
        removed += 1
    return removed


#: ``.<target name>.<pid>.<random>.tmp<suffix>``: the temporary files of :func:`atomic_path`.
_TEMPORARY = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.[^.]+\.tmp")


def remove_stale_temporaries_in(folder: PathLike) -> int:
    """Remove the temporary files left in ``folder`` by writers that are no longer running
    (:func:`remove_stale_temporaries` for every target at once); those of running processes,
    such as another job writing into the same folder, are kept. Returns how many were removed."""
    removed = 0
    try:
        names = os.listdir(folder)
    except OSError:
        return 0
    for name in names:
        found = _TEMPORARY.match(name)
        if found is None or _alive(int(found.group("pid"))):
            continue
        _remove(Path(folder) / name)
        removed += 1
    return removed


def glob_escape(text: str) -> str:
    """``text`` with glob wildcards escaped."""
    return glob.escape(text)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def _remove(path: Path) -> None:
    try:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    except OSError:
        pass


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, verify=check_nonempty if data else None) as tmp:
        tmp.write_bytes(data)
        if tmp.stat().st_size != len(data):
            raise OSError(errno.ENOSPC, "short write")


def write_text(path: PathLike, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, payload: Any, indent: int | None = 1) -> None:
    """Write ``payload`` as JSON (UTF-8, keys kept in order) to ``path`` atomically."""
    write_text(path, json.dumps(payload, indent=indent, ensure_ascii=False))


@contextmanager
def output_folder(path: PathLike) -> Iterator[Path]:
    """Create ``path`` (with parents) for a job's outputs; if the job fails, remove the folders
    this call created when they hold nothing (so no empty folder is left after a failure)."""
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder}: exists and is not a folder; choose a folder")
    created = []
    probe = folder
    while not probe.exists():
        created.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(folder, exc) from None
    if not os.access(folder, os.W_OK):
        for made in created:
            _rmdir_if_empty(made)
        raise OutputError(f"{folder}: not writable (permission denied); choose another output")
    try:
        yield folder
    except BaseException:
        for made in created:
            _rmdir_if_empty(made)
        raise


def _rmdir_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


#: Seconds a writer waits for another job to finish writing the same output (:func:`folder_lock`).
LOCK_WAIT = 600.0
_LOCKS: dict[str, list] = {}  # real path -> [RLock, depth, file descriptor]
_LOCKS_GUARD = threading.Lock()


def lock_wait() -> float:
    """Seconds a writer waits for another job's lock: ``$HQRS_GEO_LOCK_WAIT`` or :data:`LOCK_WAIT`."""
    try:
        value = float(os.environ.get("HQRS_GEO_LOCK_WAIT", LOCK_WAIT))
    except ValueError:
        return LOCK_WAIT
    return value if value >= 0 and value == value else LOCK_WAIT


class LockBusy(OutputError):
    """Another job held an output's lock for longer than the wait allowed."""


@contextmanager
def folder_lock(folder: PathLike, what: PathLike | None = None, wait: float | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``folder`` (``flock`` on the folder itself, so no lock
    file is left behind) while the block runs: other processes (and threads) taking the same
    lock wait for it. Re-entrant within a thread. ``what`` (the output being written) names the
    output in the one-line :class:`LockBusy` error raised when the lock is not free within
    ``wait`` seconds (default :func:`lock_wait`). Where the file system has no locks, the block
    runs without one."""
    key = os.path.realpath(folder)
    deadline = time.monotonic() + (lock_wait() if wait is None else wait)
    with _LOCKS_GUARD:
        entry = _LOCKS.setdefault(key, [threading.RLock(), 0, None])
    guard: Any = entry[0]
    if not guard.acquire(timeout=max(0.0, deadline - time.monotonic())):
        raise _busy(what or folder)
    try:
        if entry[1] == 0:
            entry[2] = _flock(key, deadline, what or folder)
        entry[1] += 1
        try:
            yield
        finally:
            entry[1] -= 1
            if entry[1] == 0 and entry[2] is not None:
                os.close(entry[2])  # closing the descriptor releases the flock
                entry[2] = None
    finally:
        guard.release()


def _busy(what: PathLike) -> LockBusy:
    return LockBusy(f"{what}: another job is writing it; wait for that job to end or choose another output")


def _flock(folder: str, deadline: float, what: PathLike) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive flock (None: no locking here)."""
    if fcntl is None:  # Windows: no flock
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    delay = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise _busy(what) from None
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        except OSError:  # a file system without locks (some network shares)
            os.close(fd)
            return None


def file_facts(path: PathLike) -> dict:
    """``sha256``, ``bytes`` and ``mtime_ns`` of a file: what a dataset records of each part."""
    stat = os.stat(path)
    return {"sha256": sha256_file(path), "bytes": int(stat.st_size), "mtime_ns": int(stat.st_mtime_ns)}


def sha256_file(path: PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (recorded with results, checked for parts and weights)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
