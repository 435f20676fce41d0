"""batchd: the thin client of a batch server for deep-learning training."""

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

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "BatchdError",
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
]
