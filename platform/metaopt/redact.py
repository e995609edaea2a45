"""Credentials out of logs: strip the ``user:password@`` part of URIs before they are printed or recorded.

A tracking URI may carry credentials (``http://user:pw@mlflow:5000``, ``postgresql://user:pw@db/mlflow``).
Anything metaopt logs as an MLflow param, prints, writes to an artifact (``schedules.json``) or puts on a job's
command line must go through :func:`redact_uri` / :func:`redact_config` first: params and artifacts are read by
everyone with access to the tracking server, and a job's entrypoint is shown by ``ray job list`` and the
dashboard. The userinfo is replaced by ``***`` (not dropped) so a reader can still see credentials were set.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

__all__ = ["REDACTED", "has_credentials", "redact_config", "redact_text", "redact_uri", "strip_userinfo"]

REDACTED = "***"

_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
# Userinfo as RFC 3986 and urllib read it: the authority (up to the first / ? #) up to its last "@".
_RFC_USERINFO = re.compile(rf"^({_SCHEME})([^/?#]*@)")
# Userinfo as SQLAlchemy reads database URLs (postgresql://, mysql+pymysql://, ...): "user:password@" where the
# password may hold an unescaped "/"; checked too, so a password the first reading misses is still hidden. Not
# for http(s), where MLflow's client reads URIs the RFC way and "@" may occur in a query.
_SQLALCHEMY_USERINFO = re.compile(rf"^((?!https?://){_SCHEME})([^:/@?#]*:[^@]*@)", re.IGNORECASE)


def _userinfo_span(uri: str) -> tuple[int, int] | None:
    """Where the userinfo (with its ``@``) lies in ``uri``, by the widest of the two readings; None if absent."""
    spans = [match.span(2) for pattern in (_RFC_USERINFO, _SQLALCHEMY_USERINFO) if (match := pattern.match(uri))]
    return max(spans, key=lambda span: span[1]) if spans else None


def has_credentials(uri: str) -> bool:
    """Whether ``uri`` (``scheme://...``) carries a ``user[:password]@`` part."""
    return isinstance(uri, str) and _userinfo_span(uri) is not None


def redact_uri(uri: str) -> str:
    """``uri`` with its userinfo replaced by ``***`` (``http://***@host:5000/x``); other strings unchanged."""
    if not isinstance(uri, str):
        return uri
    span = _userinfo_span(uri)
    if span is None:
        return uri
    start, end = span
    return f"{uri[:start]}{REDACTED}@{uri[end:]}"


def strip_userinfo(uri: str) -> str:
    """``uri`` without its userinfo (``http://host:5000/x``): for handing on a URI whose credentials travel
    separately (MLflow's ``MLFLOW_TRACKING_USERNAME``/``_PASSWORD``)."""
    span = _userinfo_span(uri) if isinstance(uri, str) else None
    return uri if span is None else uri[: span[0]] + uri[span[1] :]


# A URI with userinfo anywhere in a text (an error message quoting the URL it called): up to the last "@"
# before whitespace or a quote, so a password holding "/" or "@" is hidden whole (a path holding "@" is hidden
# too: erring on the safe side).
_USERINFO_IN_TEXT = re.compile(rf"({_SCHEME})[^\s'\"]*@")


def redact_text(text: str) -> str:
    """``text`` with the userinfo of every ``scheme://user:password@`` in it replaced by ``***``: for messages
    that quote a URI (MLflow's errors name the whole request URL, credentials included)."""
    return _USERINFO_IN_TEXT.sub(rf"\g<1>{REDACTED}@", text) if isinstance(text, str) else text


def redact_config(config: Any) -> Any:
    """A copy of a nested config (mappings, lists, tuples) with every URI-looking string's credentials redacted.

    Walks everything, not just ``tracking.uri``: credentials can reach a config through any field a user sets
    (``--set``), and the config is logged whole. Non-string leaves are returned as they are; the input is not
    modified.
    """
    if isinstance(config, str):
        return redact_uri(config)
    if isinstance(config, Mapping):
        return {key: redact_config(value) for key, value in config.items()}
    if isinstance(config, list):
        return [redact_config(value) for value in config]
    if isinstance(config, tuple):
        return tuple(redact_config(value) for value in config)
    return config
