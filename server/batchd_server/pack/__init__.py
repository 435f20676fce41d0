"""Packing: sources (folder trees, CSVs, arrays, samples, and the formats people
already have) decoded and written as a pack.

``batchd pack`` is :mod:`batchd_server.pack.cli`; the work is :mod:`.packer`, reading
and checking the inputs :mod:`.sources`, decoding and resizing :mod:`.decode`. The
other formats' readers (npy/npz, TFRecord, WebDataset, Parquet, HDF5) are
:mod:`.formats`, one module each; the record formats share :mod:`.stream`.
"""

from .packer import (
    PackOptions,
    PackSummary,
    pack,
    pack_arrays,
    pack_csv,
    pack_folder,
    pack_samples,
)

__all__ = [
    "PackOptions",
    "PackSummary",
    "pack",
    "pack_arrays",
    "pack_csv",
    "pack_folder",
    "pack_samples",
]
