"""User-facing errors: one line that names the file, record and field, never a traceback."""

from __future__ import annotations


class TnloraError(Exception):
    """An error caused by the user's input (config, data, paths); the CLI prints it as one line, exit 2."""


class ConfigError(TnloraError):
    """A bad key or value in a run config (YAML or command-line override)."""


class DataError(TnloraError):
    """A bad data file or record. The message names the file, the record number and the field."""

    def __init__(self, path: str, message: str, record: int | None = None, field: str | None = None):
        where = str(path)
        if record is not None:
            where += f", record {record}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {message}")
        self.path, self.record, self.field = path, record, field


class OutputError(TnloraError):
    """An output cannot be written: the folder is not writable, or the disk is full."""


class NonFiniteLoss(TnloraError):
    """Training met a NaN or infinite loss or gradient norm (``nan_policy``)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a run; the message says where it stopped and how to resume (the CLI prints it, exit 130)."""
