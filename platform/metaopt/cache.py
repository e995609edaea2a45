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


def write_atomically(path: Path, build: Callable[[Path], None]) -> bool:
    """``build`` writes a temporary file next to ``path``, which is then renamed to it, so concurrent readers
    see all of it or nothing. False (and nothing left behind) when the folder cannot be written."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        build(Path(tmp))
        os.replace(tmp, path)
        tmp = None
        return True
    except OSError:
        return False
    finally:  # also on Ctrl-C in the middle of a slow build
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
