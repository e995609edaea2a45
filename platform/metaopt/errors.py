"""The one error type user input raises.

Anything a user wrote (an experiment file, a ``--set`` override, a schedule or
optimizer spec, a data path) that we reject raises :class:`ConfigError` with a
single line naming the field and what is allowed. The CLI prints that line and
exits with code 2; nothing else is printed and nothing is written.
"""


class ConfigError(ValueError):
    """Bad user input. ``str(err)`` is one line naming the field and the allowed values."""

    def __init__(self, field: str, problem: str):
        self.field = field
        self.problem = problem
        super().__init__(f"{field}: {problem}" if field else problem)

    def __reduce__(self):
        # Rebuilt from (field, problem), not from ``args``: a trial's ConfigError crosses Ray by pickling, and
        # the default (``ConfigError(message)``) fails to unpickle, hiding the message behind a TypeError.
        return type(self), (self.field, self.problem)
