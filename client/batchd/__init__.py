"""batchd: the thin client of a batch server for deep-learning training."""

from ._client import Client, datasets, server_status
from ._exceptions import (
    AuthError,
    BatchdError,
    FingerprintError,
    NotFoundError,
    RequestError,
    ServerError,
    StateError,
    TooLargeError,
    TransportError,
    UnavailableError,
    WireError,
)
from ._info import DatasetInfo, FieldInfo
from ._split import kfold

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BatchdError",
    "Client",
    "DatasetInfo",
    "FieldInfo",
    "FingerprintError",
    "NotFoundError",
    "RequestError",
    "ServerError",
    "StateError",
    "TooLargeError",
    "TransportError",
    "UnavailableError",
    "WireError",
    "__version__",
    "datasets",
    "kfold",
    "server_status",
]

# Public names belong to the package, as tracebacks and docs should show them.
for _name in __all__:
    _obj = globals()[_name]
    if callable(_obj):
        _obj.__module__ = "batchd"
del _name, _obj
