"""batchd_server: pack datasets into flat files and serve them as training batches.

The stages, in the order data moves through them (docs/architecture.md):
:mod:`.pack` -> :mod:`.format` -> :mod:`.shuffle` -> :mod:`.augment` -> :mod:`.serve`
-> ``batchd.wire`` -> the client.
"""

from .format import FORMAT_VERSION, Dataset, DatasetWriter, Encoded, FieldSpec, open_dataset, verify
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
