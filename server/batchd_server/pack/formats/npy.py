"""NumPy ``.npy`` and ``.npz`` files, read in row slices, never loaded whole.

A ``.npy`` is one array, keyed by the file's stem (``x.npy`` -> ``x``); an ``.npz`` is
a zip of ``.npy`` members, keyed by member name (``x_train``). Each array's first axis
is the samples. ``--field NAME=KEY`` picks arrays (all of them by default), and
``--feature-shape`` reshapes a sample (``image=28,28,1`` makes MNIST's ``x`` grey images).

How each is read:

- ``.npy``: ``np.load(mmap_mode="r", allow_pickle=False)``, a memory map.
- an ``.npz`` member stored uncompressed (``np.savez``): a memory map at the member's
  data offset in the zip (local header: 30 bytes + name + extra, then the ``.npy``).
- a compressed member (``np.savez_compressed``): inflated as a stream, row slice after
  row slice, in order; zip checks its CRC-32 at the end (a mismatch names the member).

Object arrays are refused: batchd never unpickles.
"""

from __future__ import annotations

import struct
import zipfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import numpy as np
from numpy.typing import NDArray

from ...errors import ConfigError, PackError
from ..packer import PackOptions, PackSummary
from ._fields import pack_picked

__all__ = ["pack_source"]

_LOCAL = struct.Struct("<4s22xHH")  # a zip local file header: signature .. name and extra lengths


def _header(f: IO[bytes], where: str) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read(f, max_header_size=1 << 16)
    except ValueError as exc:
        raise PackError(f"{where}: not a .npy array: {exc}") from None
    if dtype.hasobject:
        raise PackError(
            f"{where}: holds Python objects (dtype {dtype}), which batchd never unpickles; "
            "save numeric arrays"
        )
    return tuple(shape), bool(fortran), dtype


def _open_npy(path: Path) -> Any:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Python objects" in str(exc):
            raise PackError(
                f"{path}: holds Python objects, which batchd never unpickles; save numeric arrays"
            ) from None
        raise PackError(f"{path}: not a readable .npy file: {exc}") from None
    except OSError as exc:
        raise PackError(f"{path}: cannot read: {exc}") from None


class _Stream:
    """A compressed ``.npz`` member: rows read forward, in order, as ``pack_columns`` asks."""

    def __init__(self, zf: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> None:
        self.f = zf.open(info)
        self.where = where
        self.shape, fortran, self.dtype = _header(self.f, where)
        if fortran and len(self.shape) > 1:
            raise PackError(
                f"{where}: a compressed Fortran-order array cannot be read row by row; save it "
                "with np.savez (uncompressed) or in C order"
            )
        self.row = self.dtype.itemsize * int(np.prod(self.shape[1:]))
        self.pos = 0

    def __getitem__(self, rows: slice) -> NDArray[Any]:
        start, stop = rows.start or 0, min(rows.stop, self.shape[0])
        if start != self.pos:
            raise PackError(f"{self.where}: rows are read in order (asked {start}, at {self.pos})")
        want = (stop - start) * self.row
        buf = self.f.read(want)
        if len(buf) != want:
            raise PackError(
                f"{self.where}: truncated: rows {start}..{stop - 1} need {want} bytes, the "
                f"member holds {len(buf)} more"
            )
        self.pos = stop
        if stop == self.shape[0]:
            self.f.read()  # to the end, where zipfile checks the member's CRC-32
        return np.frombuffer(buf, self.dtype).reshape(stop - start, *self.shape[1:])


def _npz_members(path: Path, stack: ExitStack) -> dict[str, tuple[Any, str]]:
    try:
        zf = stack.enter_context(zipfile.ZipFile(path))
    except (zipfile.BadZipFile, OSError) as exc:
        raise PackError(f"{path}: not a readable .npz (zip) file: {exc}") from None
    out: dict[str, tuple[Any, str]] = {}
    with open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[: -len(".npy")]
            where = f"{path}:{key}"
            if info.compress_type != zipfile.ZIP_STORED:
                stream = _Stream(zf, info, where)
                stack.callback(stream.f.close)
                out[key] = (stream, where)
                continue
            raw.seek(info.header_offset)
            sig, name_len, extra_len = _LOCAL.unpack(raw.read(_LOCAL.size))
            if sig != b"PK\x03\x04":
                raise PackError(f"{where}: the zip's local header is damaged")
            raw.seek(info.header_offset + _LOCAL.size + name_len + extra_len)
            shape, fortran, dtype = _header(raw, where)
            offset = raw.tell()
            need = offset + dtype.itemsize * int(np.prod(shape))
            if need > path.stat().st_size:
                raise PackError(f"{where}: truncated: the array needs bytes up to {need}")
            arr = np.memmap(
                path, dtype, "r", offset, shape, order="F" if fortran else "C"
            )  # never the whole array in RAM
            out[key] = (arr, where)
    if not out:
        raise PackError(f"{path}: an .npz with no .npy arrays in it")
    return out


def pack_source(paths: list[Path], out: Path, opts: PackOptions) -> PackSummary:
    """Pack ``.npy`` / ``.npz`` files' arrays, one field per array (see the module docstring)."""
    if opts.mode != "raw" or opts.size is not None:
        raise ConfigError(
            "--mode encoded and --size apply to images to decode; .npy/.npz arrays are "
            "packed as they are (reshape a sample with --feature-shape)"
        )
    with ExitStack() as stack:
        return _pack(paths, out, opts, stack)


def _pack(paths: list[Path], out: Path, opts: PackOptions, stack: ExitStack) -> PackSummary:
    columns: dict[str, tuple[Any, str]] = {}
    for p in paths:
        if p.suffix.lower() == ".npz":
            found = _npz_members(p, stack)
        elif p.suffix.lower() == ".npy":
            found = {p.stem: (_open_npy(p), str(p))}
        else:
            raise PackError(f"{p}: not a .npy or .npz file")
        for key, (arr, where) in found.items():
            if key in columns:
                raise PackError(
                    f"{where}: a second array keyed {key!r} (the first in {columns[key][1]})"
                )
            columns[key] = (arr, where)
    return pack_picked(columns, paths, out, opts, "npy")
