"""The pack on disk: its header, reading (memory-mapped, under read leases), writing, codecs.

The byte layout is drawn in :mod:`batchd_server.format.reader`; docs/format.md is the
reference.
"""

from . import lease
from .codec import DECODERS, decode_image
from .header import CHUNK_SIZE, FORMAT_VERSION, HEADER_NAME, Encoding, FieldSpec, Role, le_dtype
from .reader import Dataset, ReadStats, open_dataset, verify
from .writer import DatasetWriter, Encoded

__all__ = [
    "CHUNK_SIZE",
    "DECODERS",
    "FORMAT_VERSION",
    "HEADER_NAME",
    "Dataset",
    "DatasetWriter",
    "Encoded",
    "Encoding",
    "FieldSpec",
    "ReadStats",
    "Role",
    "decode_image",
    "le_dtype",
    "lease",
    "open_dataset",
    "verify",
]
