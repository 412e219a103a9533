"""User-facing errors: each says what is wrong, where, and how to fix it.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class PosttrainError(Exception):
    """An error caused by the user's input (config, data, paths), not by posttrain."""


class ConfigError(PosttrainError):
    """A config key is unknown, has an invalid value, or conflicts with another key."""


class DataError(PosttrainError):
    """A data file or row cannot be used; the message names file, line/row and problem."""

    def __init__(self, problem: str, source: str | None = None, row: int | None = None):
        self.problem = problem
        self.source = source
        self.row = row
        where = ""
        if source is not None:
            where = f"{source}:{row}: " if row is not None else f"{source}: "
        super().__init__(f"{where}{problem}")
