"""batchd_server: pack datasets into flat files and serve them as training batches."""

from .format import Dataset, open_dataset, verify
from .header import FORMAT_VERSION, FieldSpec
from .pack import (
    PackOptions,
    PackSummary,
    pack,
    pack_arrays,
    pack_csv,
    pack_folder,
    pack_samples,
)
from .writer import DatasetWriter, Encoded

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
