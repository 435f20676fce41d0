"""batchd_server: pack datasets into flat files and serve them as training batches.

The stages, in the order data moves through them (docs/architecture.md):
:mod:`.pack` -> :mod:`.format` -> :mod:`.shuffle` -> :mod:`.augment` -> :mod:`.serve`
-> ``batchd.wire`` -> the client.

The names below load on first use, so the ``batchd`` command can start (and say what
is missing) on a client-only install, where the server extra is not there.
"""

from __future__ import annotations

try:
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
except ModuleNotFoundError as _exc:  # a client-only install: batchd.entry says what to add
    if (_exc.name or "").split(".")[0] not in {"xxhash", "cv2", "click", "tqdm"}:
        raise

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
