"""Files written so that a crash at any instant (SIGKILL, the OOM killer, a node failure) leaves
either the previous file or the new one, never a torn one: the content goes to a temporary file in
the same folder, is flushed to disk, and is renamed over the target; the folder is then flushed so
the rename survives a power loss. A temporary left behind by a killed writer is named
``.NAME.PID.RANDOM.tmp`` and removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to disk; a no-op where the path
    cannot be opened read-only for that (a folder on Windows) or the file system refuses fsync."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some network file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, rename it over ``path`` and
    fsync the folder. The file gets the permissions a plain ``open(path, "w")`` would give (0o666
    less the umask), not the owner-only 0o600 of :func:`tempfile.mkstemp`: a model or checkpoint on
    a shared cluster stays readable by the group. The folder must exist."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    except OSError as err:  # name the file asked for, not the temporary (a missing folder, no permission)
        raise type(err)(err.errno, err.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` of ``text`` as UTF-8."""
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[Path]:
    """Remove the temporaries :func:`atomic_write` left in ``folder`` for the files ``names`` when
    its process was killed (each can be as large as the file: a checkpoint). Call it only where no
    other process writes those files. Returns the removed paths."""
    folder = Path(folder)
    # ours, and tempfile.mkstemp's ``.NAME.XXXXXXXX.tmp`` (what atomic_save wrote before)
    pattern = re.compile(r"\.(?P<name>.+?)\.(?:\d+\.[0-9a-f]{8}|[a-z0-9_]{8})\.tmp")
    wanted = set(names)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = pattern.fullmatch(entry.name)
        if match and match["name"] in wanted and entry.is_file():
            entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed
