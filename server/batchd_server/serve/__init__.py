"""Serving: the registry of packs, the batch engine and its helpers, the HTTP app, the CLI.

A request's path through these modules is drawn in docs/architecture.md. Exports are
loaded on first use, so ``batchd --help`` (which imports :mod:`.cli`) does not pay
for FastAPI, OpenCV and the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .engine import Engine, EngineConfig, Served
    from .metrics import Metrics
    from .registry import Registry
    from .request import BatchRequest

__all__ = [
    "BatchRequest",
    "Engine",
    "EngineConfig",
    "Metrics",
    "Registry",
    "Served",
    "create_app",
]

_HOME = {
    "BatchRequest": ".request",
    "Engine": ".engine",
    "EngineConfig": ".engine",
    "Metrics": ".metrics",
    "Registry": ".registry",
    "Served": ".engine",
    "create_app": ".app",
}


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(home, __name__), name)
