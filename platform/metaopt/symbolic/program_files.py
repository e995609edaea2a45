"""Program values that name files: which values do, and how a config makes them absolute and checks them.

A program value (``symbolic.start``, an optimizer spec's ``program``) is a built-in name, program text, its
JSON, or a file holding either. Tune runs each trial in a folder of its own, so a file name is made absolute
while the experiment file is loaded, against the directory the user ran from. This module is imported whenever
an experiment file is loaded: it stays free of numpy, torch and JAX.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationInfo

from metaopt.config import exists, quote, quote_path, read_text_capped, validation_base
from metaopt.errors import ConfigError
from metaopt.symbolic.program import BUILTIN_PROGRAMS


def names_program_file(value: Any) -> bool:
    """Whether a program value names a file rather than holding the program: one line, not JSON, not
    ``def ...``, not a built-in name (the rule :func:`metaopt.symbolic.search.load_start_program` reads by)."""
    return (
        isinstance(value, str)
        and bool(value.strip())
        and value not in BUILTIN_PROGRAMS
        and "\n" not in value
        and not value.lstrip().startswith(("{", "def "))
    )


def absolute_program(value: Any, info: ValidationInfo | None) -> Any:
    """A program value with a file name made absolute and the file checked (regular, <= 1 MiB, UTF-8); any
    other value unchanged. The sections read the program at load time whether or not paths are checked, and
    reading a FIFO, ``/dev/zero`` or a binary file must not hang or crash there."""
    if not names_program_file(value):
        return value
    base, check = validation_base(info)
    path = Path(os.path.normpath(base / os.path.expanduser(value)))
    if exists(path):
        try:
            read_text_capped(path, "", "program file")
        except ConfigError as err:
            raise ConfigError("", f"{quote_path(path)}: {err.problem}") from None
    elif check:
        builtins = ", ".join(BUILTIN_PROGRAMS)
        raise ConfigError(
            "",
            f"{quote(value)} is not {builtins}, program text, or an existing file (relative "
            f"paths are read from {quote_path(base)})",
        )
    return str(path)
