"""numpy's private internals, behind one door (written against ``numpy~=2.4``).

- ``array_globals``: what ``torch.load(weights_only=True)`` must be allowed to call to rebuild pickled numpy
  arrays and scalars (RLlib's task state holds them): ``numpy._core.multiarray._reconstruct`` and ``scalar``,
  the functions numpy's own pickles name, plus the public array and dtype types. Fallback: the public types
  only; a checkpoint holding numpy arrays is then refused by torch and named as an unreadable checkpoint (a
  clear error, never a silently wrong state), while checkpoints of torch tensors load as before.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

from metaopt.compat import private_api_usable, warn_fallback

WRITTEN_FOR = "~=2.4"
"""The numpy versions whose private pickle helpers this module names."""

_PICKLE_FUNCTIONS = ("_reconstruct", "scalar")


def array_globals() -> list[Any]:
    """The globals numpy arrays and scalars need under ``weights_only`` (none of them calls anything else)."""
    dtypes = {type(np.dtype(code)) for code in "?bhilqpBHILQPefdgFDGUS"}
    public: list[Any] = [np.ndarray, np.dtype, *dtypes]
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:
        multiarray = None
    if multiarray is not None and private_api_usable(
        "numpy", WRITTEN_FOR, *((multiarray, name) for name in _PICKLE_FUNCTIONS)
    ):
        return [*(getattr(multiarray, name) for name in _PICKLE_FUNCTIONS), *public]
    warn_fallback(
        "numpy.array_globals",
        f"metaopt.compat.numpy: numpy's pickle helpers are not allowed on this numpy version (written for "
        f"numpy{WRITTEN_FOR}); checkpoints holding numpy arrays will be refused as unreadable",
    )
    return public
