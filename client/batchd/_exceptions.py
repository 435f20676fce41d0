"""The exceptions batchd raises, all rooted at :class:`BatchdError`.

::

    BatchdError                  anything batchd raises on purpose
    ├── WireError                a response body that is not a valid batchd batch
    ├── TransportError           no server answered within the deadline (after retries)
    ├── ServerError              the server answered with an error status
    │   ├── RequestError         4xx: the request was wrong; retrying will not help
    │   │   ├── AuthError        401/403: missing or wrong token
    │   │   ├── NotFoundError    404: unknown dataset, pipeline or batch index
    │   │   └── TooLargeError    413: the batch would exceed the server's response cap
    │   └── UnavailableError     502/503/504 after the deadline ran out
    ├── FingerprintError         the dataset changed on the server mid-run
    └── StateError               a state_dict that does not match this client

The server package adds its own subclasses (format, pack and config errors) under
the same root, so ``except batchd.BatchdError`` catches everything batchd raises.
"""

from __future__ import annotations

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
]


class BatchdError(Exception):
    """Root of every error batchd raises on purpose."""


class WireError(BatchdError):
    """A response body that does not decode as a batchd batch (see docs/protocol.md)."""


class TransportError(BatchdError):
    """No server could be reached before the retry deadline ran out."""


class ServerError(BatchdError):
    """The server answered with an error status; carries its JSON ``{error, detail}``."""

    def __init__(self, status: int, error: str, detail: str, url: str = "") -> None:
        self.status = status
        self.error = error
        self.detail = detail
        self.url = url
        where = f" ({url})" if url else ""
        super().__init__(f"{status} {error}: {detail}{where}")


class RequestError(ServerError):
    """A 4xx: the request itself is wrong, so retrying cannot help."""


class AuthError(RequestError):
    """401/403: the token is missing or wrong."""


class NotFoundError(RequestError):
    """404: unknown dataset, pipeline or batch index."""


class TooLargeError(RequestError):
    """413: one batch would exceed the server's response-size cap."""


class UnavailableError(ServerError):
    """502/503/504 that outlasted the retry deadline."""


class FingerprintError(BatchdError):
    """The dataset's fingerprint changed mid-run; mixing old and new data is refused."""


class StateError(BatchdError):
    """A ``state_dict`` that does not belong to a client with these parameters."""
