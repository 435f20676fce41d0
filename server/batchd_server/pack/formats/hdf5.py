"""HDF5 files' datasets via ``h5py`` (the ``batchd[hdf5]`` extra), read in row slices.

Every numeric dataset (at any depth; keyed by its path, ``train/images``, stored as
``train_images``) with a first axis is a field, or those ``--field NAME=KEY`` picks;
all need one length. ``h5py`` reads each 8 MiB slice of rows straight from the file
(decompressing only the chunks it covers), so the file is never in memory. Scalars,
strings and compound datasets are left out with a note. A read that fails (a corrupt
chunk, a truncated file) names the file, the dataset and the rows.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import ConfigError, PackError
from ..packer import PackOptions, PackSummary
from . import require
from ._fields import pack_picked

__all__ = ["pack_source"]


def pack_source(paths: list[Path], out: Path, opts: PackOptions) -> PackSummary:
    """Pack HDF5 datasets, one field per dataset (see the module docstring)."""
    h5py = require("hdf5", "h5py")
    if opts.mode != "raw" or opts.size is not None:
        raise ConfigError(
            "--mode encoded and --size apply to images to decode; HDF5 arrays are packed as "
            "they are (reshape a sample with --feature-shape)"
        )
    columns: dict[str, tuple[Any, str]] = {}
    left: list[str] = []
    with ExitStack() as stack:
        for path in paths:
            try:
                f = stack.enter_context(h5py.File(path, "r"))
            except OSError as exc:
                raise PackError(f"{path}: not a readable HDF5 file: {exc}") from None
            found = _datasets(h5py, f)
            for name, ds in found:
                numeric = np.dtype(ds.dtype).kind in "biuf" and len(ds.shape) >= 1
                if not numeric and not opts.fields:
                    left.append(name)
                    continue
                if name in columns:
                    raise PackError(
                        f"{path}:{name}: a second dataset {name!r} (one in {columns[name][1]})"
                    )
                columns[name] = (ds, f"{path}:{name}")
        if not columns:
            raise PackError(f"{paths[0]}: no numeric datasets with a first (sample) axis to pack")
        notes = (
            [f"left out the datasets {left} (scalars, strings or compound types)"] if left else []
        )
        return pack_picked(columns, paths, out, opts, "hdf5", notes)


def _datasets(h5py: Any, f: Any) -> list[tuple[str, Any]]:
    """Every dataset in the file, at any depth, by path, in h5py's (name) order."""
    found: list[tuple[str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj))

    f.visititems(visit)
    return found
