"""batchd_server: pack datasets into flat files and serve them as training batches.

The stages, in the order data moves through them (docs/architecture.md):
:mod:`.pack` -> :mod:`.format` -> :mod:`.shuffle` -> :mod:`.augment` -> :mod:`.serve`
-> ``batchd.wire`` -> the client.

The names below load on first use, so the ``batchd`` command can start (and say what
is missing) on a client-only install, where the server extra is not there.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .format import (
        FORMAT_VERSION,
        Dataset,
        DatasetWriter,
        Encoded,
        FieldSpec,
        open_dataset,
        verify,
    )
    from .pack import (
        PackOptions,
        PackSummary,
        pack,
        pack_arrays,
        pack_csv,
        pack_folder,
        pack_samples,
    )

__all__ = [
    "FORMAT_VERSION",
    "Dataset",
    "DatasetWriter",
    "Encoded",
    "FieldSpec",
    "PackOptions",
    "PackSummary",
    "open_dataset",
    "pack",
    "pack_arrays",
    "pack_csv",
    "pack_folder",
    "pack_samples",
    "verify",
]

_FORMAT = {"FORMAT_VERSION", "Dataset", "DatasetWriter", "Encoded", "FieldSpec"}
_FORMAT |= {"open_dataset", "verify"}


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = ".format" if name in _FORMAT else ".pack"
    return getattr(importlib.import_module(home, __name__), name)
