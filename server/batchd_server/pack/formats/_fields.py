"""What every format reader shares: which source keys become which fields, and shapes.

A source's keys (npz members, HDF5 dataset paths, TFRecord features, Parquet columns,
WebDataset extensions) become field names: all of them, spelled as field names, or
only those ``--field NAME=KEY`` picks. ``--feature-shape NAME=28,28,1`` reshapes a field.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ...errors import PackError
from ...format import Role
from ...format.header import RESERVED

if TYPE_CHECKING:
    from pathlib import Path

    from ..packer import PackOptions, PackSummary

__all__: list[str] = []


def field_name(key: str) -> str:
    """A source key spelled as a field name: ``image/encoded`` -> ``image_encoded``."""
    name = re.sub(r"[^A-Za-z0-9_]", "_", key)[:64] or "_"
    if name[0].isdigit():
        name = ("_" + name)[:64]
    return f"source_{name}"[:64] if name in RESERVED else name


def choose(keys: Sequence[str], opts: PackOptions, where: str) -> tuple[dict[str, str], list[str]]:
    """``{key: field name}`` for the keys to pack, in the source's order, and notes.

    With ``--field`` only the keys it names, each under its NAME (an unknown KEY is a
    PackError listing what ``where`` holds); otherwise every key, renamed where its
    spelling is not a field name (said in a note).
    """
    if opts.fields:
        missing = [k for _, k in opts.fields if k not in keys]
        if missing:
            raise PackError(
                f"{where}: no {missing[0]!r} to take with --field; it holds {list(keys)}"
            )
        return {k: n for n, k in opts.fields}, []
    out: dict[str, str] = {}
    notes: list[str] = []
    for key in keys:
        name = field_name(key)
        if name in out.values():
            raise PackError(
                f"{where}: the keys {[k for k in out if out[k] == name] + [key]} are both "
                f"field {name!r}; name them apart with --field NAME=KEY"
            )
        out[key] = name
        if name != key:
            notes.append(f"{key!r} is stored as field {name!r}")
    return out, notes


def shape_for(name: str, key: str, opts: PackOptions) -> tuple[int, ...] | None:
    """The ``--feature-shape`` given for this field (by field name or source key), if any."""
    for n, shape in opts.feature_shapes:
        if n in (name, key):
            return shape
    return None


def check_shapes_used(names: Mapping[str, str], opts: PackOptions, where: str) -> None:
    """A ``--feature-shape`` that names no packed field is a typo: say so, do not ignore it."""
    known = set(names) | set(names.values())
    for n, _ in opts.feature_shapes:
        if n not in known:
            raise PackError(
                f"{where}: --feature-shape {n}=...: no such field; the fields are "
                f"{sorted(names.values())}"
            )


def reshaped(
    name: str, shape: tuple[int, ...], target: tuple[int, ...] | None, where: str
) -> tuple[int, ...]:
    """``shape`` (one sample's), or ``target`` if it holds as many elements (else PackError)."""
    if target is None:
        return shape
    if int(np.prod(shape)) != int(np.prod(target)):
        raise PackError(
            f"{where}: field {name!r} holds {int(np.prod(shape))} values per sample "
            f"(shape {shape}), which --feature-shape {','.join(map(str, target))} cannot hold"
        )
    return target


def guess_roles(specs: Mapping[str, tuple[np.dtype[Any], tuple[int, ...]]]) -> dict[str, Role]:
    """Roles for raw fields: ``image``/``mask`` by name as for arrays; and where no field is
    called ``image``, the one uint8 ``HxWx1|3`` field (a TFRecord's ``image_raw``) is the image.
    """
    roles: dict[str, Role] = {}
    for name, (dtype, shape) in specs.items():
        u8 = dtype == np.uint8
        if name == "image" and u8 and len(shape) == 3 and shape[2] in (1, 3):
            roles[name] = "image"
        elif name == "mask" and u8 and len(shape) == 2:
            roles[name] = "mask"
        else:
            roles[name] = "value"
    if "image" not in roles.values():
        like = [
            n
            for n, (dt, sh) in specs.items()
            if dt == np.uint8 and len(sh) == 3 and sh[2] in (1, 3) and roles[n] == "value"
        ]
        if len(like) == 1:
            roles[like[0]] = "image"
    return roles


def grey_hint(specs: Mapping[str, tuple[np.dtype[Any], tuple[int, ...]]]) -> list[str]:
    """Notes for uint8 ``HxW`` values (MNIST's ``x``): a channel axis makes them images."""
    return [
        f"field {n!r} is uint8 {sh[0]}x{sh[1]}, packed as a value; --feature-shape "
        f"{n}={sh[0]},{sh[1]},1 packs it as a grey image"
        for n, (dt, sh) in specs.items()
        if dt == np.uint8 and len(sh) == 2 and n != "mask"
    ]


class Column:
    """An array source for :func:`~batchd_server.pack.packer.pack_columns`: rows by slice.

    Wraps a memory map, a zip-member stream or an ``h5py`` dataset; reshapes each sample
    to ``sample_shape`` (``--feature-shape``) and turns a read that fails (a truncated
    file, a bad zip CRC, an HDF5 error) into a PackError naming ``where`` and the rows.
    """

    def __init__(self, inner: Any, sample_shape: tuple[int, ...], where: str) -> None:
        self.inner = inner
        self.dtype: np.dtype[Any] = np.dtype(inner.dtype)
        self.shape = (int(inner.shape[0]), *sample_shape)
        self.where = where

    def __getitem__(self, rows: slice) -> NDArray[Any]:
        start, stop = rows.start or 0, min(rows.stop, self.shape[0])
        try:
            got = np.asarray(self.inner[start:stop])
        except PackError:
            raise
        except (OSError, ValueError, EOFError, RuntimeError, KeyError, zipfile.BadZipFile) as exc:
            raise PackError(
                f"{self.where}: reading rows {start}..{stop - 1} failed: {exc}; the file is "
                "damaged or truncated (nothing was written)"
            ) from None
        return got.reshape(stop - start, *self.shape[1:])


def pick_columns(
    columns: Mapping[str, tuple[Any, str]], opts: PackOptions, where: str
) -> tuple[dict[str, Column], dict[str, str], list[str]]:
    """The arrays to pack, by field name; ``{field: key}``; notes. ``columns`` maps each
    source key to (its array, where it is), every array's first axis the samples."""
    names, notes = choose(list(columns), opts, where)
    check_shapes_used(names, opts, where)
    out: dict[str, Column] = {}
    for key, name in names.items():
        arr, at = columns[key]
        if len(arr.shape) < 1:
            raise PackError(f"{at}: a scalar, not an array of samples (a first axis)")
        sample = tuple(int(d) for d in arr.shape[1:])
        out[name] = Column(arr, reshaped(name, sample, shape_for(name, key, opts), at), at)
    lengths = {name: c.shape[0] for name, c in out.items()}
    if len(set(lengths.values())) > 1:
        raise PackError(
            f"{where}: the arrays differ in length ({lengths}); every field needs one row per "
            "sample: pick arrays of one length with --field NAME=KEY (e.g. --field "
            "image=x_train --field label=y_train)"
        )
    return out, {n: k for k, n in names.items()}, notes


class SourceBase:
    """What every record reader holds for :func:`~batchd_server.pack.stream.pack_records`:
    its files, the options, and what the header will say (filled in as it reads)."""

    kind = ""

    def __init__(self, paths: list[Path], opts: PackOptions) -> None:
        self.paths = paths
        self.opts = opts
        self.source = ", ".join(str(p) for p in paths)
        self.total: int | None = None
        self.classes: list[str] | None = None
        self.notes: list[str] = []
        self.extra: dict[str, Any] = {}
        self.names: dict[str, str] | None = None  # {source key: field}, from the first record


def pack_picked(
    columns: Mapping[str, tuple[Any, str]],
    paths: list[Path],
    out: Path,
    opts: PackOptions,
    kind: str,
    notes: Sequence[str] = (),
) -> PackSummary:
    """Pack an array format's arrays (``{key: (array, where)}``): the ``--field`` pick,
    ``--feature-shape``, roles, and :func:`~batchd_server.pack.packer.pack_columns`."""
    from ..packer import pack_columns

    where = str(paths[0]) if len(paths) == 1 else f"{paths[0]} and {len(paths) - 1} more"
    arrays, keys, picked = pick_columns(columns, opts, where)
    notes = [*notes, *picked]
    if opts.on_error == "skip":
        notes.append(f"--on-error skip has no effect on {kind} arrays: a read that fails stops")
    for col in arrays.values():
        if col.dtype.kind not in "biuf":
            raise PackError(f"{col.where}: dtype {col.dtype} cannot be packed (numbers only)")
        if col.shape[0] == 0:
            raise PackError(f"{col.where}: no rows; nothing to pack")
    specs = {n: (c.dtype, c.shape[1:]) for n, c in arrays.items()}
    roles = guess_roles(specs)
    notes += grey_hint({n: s for n, s in specs.items() if roles[n] == "value"})
    return pack_columns(
        out,
        arrays,
        roles=roles,
        overwrite=opts.overwrite,
        progress=opts.progress,
        kind=kind,
        source=", ".join(str(p) for p in paths),
        notes=notes,
        extra={"fields": keys},
    )
