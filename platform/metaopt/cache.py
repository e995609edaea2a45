"""The local cache: derived copies of things that are slow to make and the same every time.

Cache directory: ``$METAOPT_CACHE_DIR``, else ``$XDG_CACHE_HOME/metaopt``, else ``~/.cache/metaopt``. What lives
there (scikit-learn's digits as a small ``.npz``, an empty MLflow store per MLflow version) can be deleted at any
time; a cache that cannot be written (read-only home) or read (a broken file) only costs making the thing again.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where metaopt keeps derived copies of packaged data."""
    if os.environ.get("METAOPT_CACHE_DIR"):
        return Path(os.environ["METAOPT_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "metaopt"


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` fills a temporary file next to ``path``; it is flushed to disk (fsync) and renamed over ``path``
    (``os.replace``), and the folder's entry is flushed too. A crash, a kill or an exception at any point leaves
    ``path`` as it was or wholly new, never half written: what checkpoints need. Errors propagate (a checkpoint
    that cannot be written must fail loudly); the temporary never stays behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    renamed = False
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        renamed = True
        _fsync_folder(path.parent)
    finally:  # also on Ctrl-C in the middle of a slow write
        if not renamed:
            tmp.unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable; a platform or file system that cannot open folders skips it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomically(path: Path, build: Callable[[Path], None]) -> bool:
    """:func:`replace_atomically` for the cache: False (and nothing left behind) when the folder cannot be
    written, since a missing cache entry only costs making the thing again."""
    try:
        replace_atomically(path, build)
        return True
    except OSError:
        return False
