"""MLflow's private internals, behind one door (written against ``mlflow==3.17.*``).

- ``build_empty_store``: MLflow makes a sqlite store by creating its first tables and running every schema
  migration since (``mlflow.store.db.utils._initialize_tables``); :func:`metaopt.tracking.empty_store_template`
  calls that same function once to cache an empty store and copies it for each new one (``_get_schema_version``
  and ``_get_latest_schema_revision`` check that the copy is at MLflow's newest revision). Fallback: no template;
  MLflow makes each new store itself on first use, seconds slower per store
  (:func:`metaopt.tracking.empty_store_template` says why; the figures are in benchmarks/results.csv).
"""

from __future__ import annotations

from typing import Any

from metaopt.compat import private_api_usable, warn_fallback

WRITTEN_FOR = "==3.17.*"
"""The MLflow versions whose private internals this module uses."""

_STORE_FUNCTIONS = ("_initialize_tables", "_get_schema_version", "_get_latest_schema_revision")


def can_build_empty_store() -> bool:
    """Whether this MLflow's store internals are the ones :func:`build_empty_store` knows; says once if not."""
    from mlflow.store.db import utils

    if private_api_usable("mlflow", WRITTEN_FOR, *((utils, name) for name in _STORE_FUNCTIONS)):
        return True
    warn_fallback(
        "mlflow.build_empty_store",
        f"metaopt.compat.mlflow: MLflow's private store set-up is not used on this MLflow version "
        f"(written for mlflow{WRITTEN_FOR}); each new sqlite store is made by MLflow itself (seconds slower)",
    )
    return False


def build_empty_store(engine: Any) -> None:
    """Create MLflow's tables, at its newest schema revision, in the empty database behind ``engine``.

    Only where :func:`can_build_empty_store`. Raises RuntimeError when the build did not reach MLflow's newest
    revision.
    """
    from mlflow.store.db import utils

    utils._initialize_tables(engine)
    built, newest = utils._get_schema_version(engine), utils._get_latest_schema_revision()
    if built != newest:
        raise RuntimeError(f"the new store is at revision {built}, MLflow's newest is {newest}")
