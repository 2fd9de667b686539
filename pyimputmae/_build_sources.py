"""The digest of what the compiled extension is built from.

setup.py records it in ``_build_config.json`` as ``sources_sha256``. Where the build's sources lie
beside the package (a source checkout, an editable install), ``pyimputmae info`` compares the
record with the sources as they are now: a ``_C`` built before a ``git pull`` or an edit of
``csrc/`` is then named stale instead of silently running the old kernels. ``tools/prebuilt_ext.py``
uses it too: an extension built on another machine is used only for the sources it was built from.

Standard library only: setup.py loads this file by path, before the package can be imported.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

#: what a build of ``pyimputmae._C`` reads, relative to the source root: every file under these
#: folders but notes, objects and editors' files (a header of any suffix is read if it is included),
#: and the file that sets the compiler flags; CUDA sources only for a build with the CUDA kernels
SOURCE_DIRS = ("csrc",)
NOT_READ = frozenset({".md", ".txt", ".rst", ".o", ".obj", ".d", ".swp", ".orig", ".rej", ".bak"})
CUDA_ONLY = frozenset({".cu", ".cuh"})
FLAG_FILES = ("setup.py",)


def source_files(root: str | Path, cuda: bool = True) -> list[Path]:
    """The files :func:`sources_digest` reads under ``root``, sorted by their relative path."""
    root = Path(root)
    skip = NOT_READ if cuda else NOT_READ | CUDA_ONLY
    files = [p for d in SOURCE_DIRS if (root / d).is_dir()
             for p in (root / d).rglob("*") if p.is_file() and p.suffix.lower() not in skip
             and not p.name.startswith(".") and not p.name.endswith("~")]
    files += [root / f for f in FLAG_FILES if (root / f).is_file()]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def sources_digest(root: str | Path, cuda: bool = True) -> str | None:
    """SHA-256 over the relative path and bytes of every file of :func:`source_files` (names and
    contents only: a fresh clone and a checkout with other timestamps agree); ``cuda``: whether the
    build compiles the CUDA kernels (a C++-only build is not made stale by an edit of a ``.cu``
    file). None when ``root`` holds no ``csrc/``, as an installed package's folder does not."""
    root = Path(root)
    if not any((root / d).is_dir() for d in SOURCE_DIRS):
        return None
    h = hashlib.sha256()
    for path in source_files(root, cuda):
        data = path.read_bytes()
        for part in (path.relative_to(root).as_posix().encode() + b"\0", len(data).to_bytes(8, "little"), data):
            h.update(part)
    return h.hexdigest()


def checkout_root() -> Path | None:
    """The source root beside this package when it runs from a checkout (``csrc/`` and ``setup.py``
    next to the ``pyimputmae/`` folder), else None."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "csrc").is_dir() and (root / "setup.py").is_file() else None
