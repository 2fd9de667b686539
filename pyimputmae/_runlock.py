"""One writer at a time per training ``out_dir`` and per preprocessing store.

Two runs writing the same folder (a job started twice, a scheduler's requeue while the first copy
still runs, two terminals) would overwrite each other's checkpoints, journal and arrays, and each
would resume from the other's half-written state. :func:`exclusive_use` takes an exclusive advisory
lock (``flock``) on a small lock file for as long as a run writes, and refuses a second run at once,
naming the first one's process, host, start time and command.

The operating system drops the lock when the holder ends however it ends, SIGKILL included, so a
crashed run never leaves a stale lock behind: its lock file stays, unlocked, and the next run takes
it. On a file system that does not support ``flock`` (some network mounts) and on Windows the run
goes ahead unlocked, with a warning in the first case.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]


class InUseError(RuntimeError):
    """Another run is writing the same out_dir or store."""


def _holder(fd: int) -> str:
    """Who holds the lock, from what they wrote into the lock file."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        command = " ".join(info.get("argv") or []) or "?"
        return (f"process {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('started', '?')}: "
                f"{command}")
    except (OSError, ValueError, AttributeError):
        return "a process that has not yet recorded itself"


def _record(fd: int) -> None:
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else []}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def _acquire(path: Path, what: str, advice: str) -> int | None:
    """An open descriptor of ``path`` holding its exclusive lock; None where locks are not supported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise InUseError(f"{what} is being written by another run ({holder}; lock file {path}). Two runs "
                             f"there would overwrite each other's files. {advice}") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            warnings.warn(f"the file system of {path} does not support locks ({err.strerror}): nothing stops a "
                          f"second run from writing {what} at the same time", RuntimeWarning, stacklevel=4)
            return None
        # the lock file may have been removed (by the run that held it, ending) between our open and
        # our lock: then we would hold a lock on a file nobody else sees; open the path afresh
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise InUseError(f"could not lock {path} for {what}: it kept being replaced. {advice}")  # pragma: no cover


@contextlib.contextmanager
def exclusive_use(lock_path: str | os.PathLike, what: str, advice: str) -> Iterator[None]:
    """Hold an exclusive lock on ``lock_path`` (created, with its folder) for the ``with`` block.

    what: the thing locked, as the error names it (``"out_dir runs/a"``); advice: what to do instead
    (ends the message). :class:`InUseError` when another process holds it. The lock file is removed
    when the block ends; a crash leaves it, unlocked."""
    path = Path(lock_path)
    fd = _acquire(path, what, advice) if fcntl is not None else None
    if fd is None:
        yield
        return
    try:
        _record(fd)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # while still locked: a run that opened this file meanwhile retries on a new one
        os.close(fd)
