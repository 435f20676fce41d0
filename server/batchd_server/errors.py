"""Server-side errors, under the same root as the client's.

::

    batchd.BatchdError
    ├── FormatError       a pack on disk is missing, torn, corrupt or of another version
    │   └── StaleError    a pack file shrank or changed while it was being read: reopen it
    ├── PackError         the packer's input is wrong (empty folder, bad CSV, unreadable image)
    ├── PipelineError     an augmentation pipeline that does not validate (names op and parameter)
    ├── ConfigError       a server option that cannot work (names the option and the value)
    └── Rejected          a request the server refuses; each kind owns its HTTP status and code
        ├── InvalidParameter    400 invalid_parameter
        ├── InvalidName         400 invalid_name
        ├── InvalidPipeline     400 invalid_pipeline
        ├── UnknownDataset      404 unknown_dataset
        ├── DatasetUnavailable  404 dataset_unavailable
        ├── BatchOutOfRange     404 batch_out_of_range
        ├── BatchTooLarge       413 batch_too_large
        ├── DatasetChanged      409 dataset_changed
        ├── DatasetCorrupt      409 dataset_corrupt
        └── Overloaded          503 overloaded (with Retry-After)

The serving code raises these domain errors and knows no HTTP; ``serve/app.py`` maps
every :class:`Rejected` to ``{"error": code, "detail": detail}`` in one handler.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from batchd import BatchdError

__all__ = [
    "BatchOutOfRange",
    "BatchTooLarge",
    "ConfigError",
    "DatasetChanged",
    "DatasetCorrupt",
    "DatasetUnavailable",
    "FormatError",
    "InvalidName",
    "InvalidParameter",
    "InvalidPipeline",
    "Overloaded",
    "PackError",
    "PipelineError",
    "Rejected",
    "StaleError",
    "UnknownDataset",
]


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


class Rejected(BatchdError):
    """A request the server refuses. Subclasses own ``status`` (HTTP) and ``code`` (stable).

    ``detail`` is the message a user reads: what is wrong and how to fix it.
    """

    status: ClassVar[int] = 400
    code: ClassVar[str] = "rejected"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        self.detail = detail
        self.headers = headers or {}
        super().__init__(f"{self.status} {self.code}: {detail}")


class InvalidParameter(Rejected):
    """A query parameter out of its range; the detail starts with the parameter's name."""

    code = "invalid_parameter"

    def __init__(self, param: str, detail: str) -> None:
        self.param = param
        super().__init__(f"{param}: {detail}")


class InvalidName(Rejected):
    """A dataset name that could be a path or is not a plain directory name."""

    code = "invalid_name"


class InvalidPipeline(Rejected):
    """An ``augment`` pipeline that does not validate, or does not fit a sample."""

    code = "invalid_pipeline"

    def __init__(self, exc: PipelineError) -> None:
        # The message already names the op (by position and name) and the parameter.
        super().__init__(f"augment: {exc}")


class UnknownDataset(Rejected):
    status = 404
    code = "unknown_dataset"


class DatasetUnavailable(Rejected):
    """A pack directory the server found but cannot open (the detail says why)."""

    status = 404
    code = "dataset_unavailable"


class BatchOutOfRange(Rejected):
    status = 404
    code = "batch_out_of_range"


class BatchTooLarge(Rejected):
    status = 413
    code = "batch_too_large"


class DatasetChanged(Rejected):
    """The pack kept changing on disk while a batch was computed from it."""

    status = 409
    code = "dataset_changed"


class DatasetCorrupt(Rejected):
    status = 409
    code = "dataset_corrupt"


class Overloaded(Rejected):
    """Too many batches computing: the client should retry after ``Retry-After``."""

    status = 503
    code = "overloaded"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, headers={"Retry-After": "1"})
