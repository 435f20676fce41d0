"""Server-side errors, under the same root as the client's.

::

    batchd.BatchdError
    ├── FormatError       a pack on disk is missing, torn, corrupt or of another version
    │   └── StaleError    a pack file shrank or changed while it was being read: reopen it
    ├── PackError         the packer's input is wrong (empty folder, bad CSV, unreadable image)
    ├── PipelineError     an augmentation pipeline that does not validate (names op and parameter)
    └── ConfigError       a server option that cannot work (names the option and the value)
"""

from __future__ import annotations

from pathlib import Path

from batchd import BatchdError

__all__ = ["ConfigError", "FormatError", "PackError", "PipelineError", "StaleError"]


class FormatError(BatchdError):
    """A pack that cannot be used as it is; names the file and what is wrong."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class StaleError(FormatError):
    """A read came up short: the file was truncated or rewritten in place since it was opened.

    Not corruption of the pack as written (a short read of a file whose size was checked
    at open means someone changed it under us), so the server re-opens the pack and
    retries instead of reporting it corrupt.
    """


class PackError(BatchdError):
    """Input the packer cannot pack; says which input, where, and how to fix it."""


class PipelineError(BatchdError):
    """An augmentation pipeline that does not validate.

    ``op_index`` and ``param`` locate the problem; the message says what is allowed.
    """

    def __init__(
        self, message: str, *, op_index: int | None = None, param: str | None = None
    ) -> None:
        self.op_index = op_index
        self.param = param
        super().__init__(message)


class ConfigError(BatchdError):
    """A server or CLI option whose value cannot work; names the option and the value."""
