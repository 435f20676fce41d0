"""Packing's inputs, read and checked: image-folder trees and CSVs scanned into rows
and targets; Python arrays and samples given field specs and converted for the writer.

Everything that can be checked before decoding (empty input, missing columns,
non-numeric targets) is checked here, so a long pack does not fail at the end for
a reason it could have given at the start.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError, PackError
from ..format import Encoded, FieldSpec, Role, decode_image, le_dtype

__all__ = ["LITTER_NAMES", "PATH_COLUMNS", "is_litter"]

PATH_COLUMNS = ("image", "path", "filename")


# --------------------------------------------------------------------------- image inputs


@dataclass(frozen=True)
class Row:
    """One image input: a file's path, or (a streamed source's record) its encoded bytes."""

    image: Path | bytes
    mask: Path | bytes | None
    where: str = ""  # "line 14" for a CSV; "a.tfrecord record 7" for bytes; a tree's: its path

    def name(self) -> str:
        """How an error names this input: its path (and CSV line), or its record."""
        if isinstance(self.image, bytes):
            return self.where
        return f"{self.image} ({self.where})" if self.where else str(self.image)


@dataclass(frozen=True, kw_only=True)
class Inputs:
    rows: list[Row]
    values: dict[str, NDArray[Any]] = field(default_factory=dict)
    classes: list[str] | None = None
    kind: str = "folder"
    extra: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    """What the user should know about how the input was read (printed, and kept in the header)."""


LabelFrom = Literal["class", "int", "float"]

# What operating systems and NAS boxes leave in folders; never images, never classes.
LITTER_NAMES = frozenset({"Thumbs.db", "thumbs.db", "desktop.ini", "Desktop.ini", "@eaDir"})


def is_litter(name: str) -> bool:
    """Hidden files (``.DS_Store``, ``._photo.jpg``), ``Thumbs.db``, ``desktop.ini``, ``@eaDir``."""
    return name.startswith(".") or name in LITTER_NAMES


def scan_folder(
    root: Path, *, label_from: LabelFrom = "class", keep_empty_classes: bool = False
) -> Inputs:
    """An image-folder tree: one subfolder per class, its files (at any depth) the images.

    ``label_from="class"`` numbers the folders in sorted order (``classes``); ``"int"``
    and ``"float"`` read each folder's name as the number itself (a count, a score).
    """
    if label_from not in ("class", "int", "float"):
        raise ConfigError(f"label_from {label_from!r}: use class, int or float")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_litter(p.name))
    if not folders:
        raise PackError(
            f"{root}: no class subfolders; an image-folder tree has one subfolder per class"
        )
    files = {
        name: sorted(
            p
            for p in (root / name).rglob("*")
            if p.is_file() and not any(is_litter(s) for s in p.relative_to(root).parts)
        )
        for name in folders
    }
    notes: list[str] = []
    empty = [name for name in folders if not files[name]]
    if empty and len(empty) == len(folders):
        raise PackError(f"{root}: the class folders {folders} hold no files; nothing to pack")
    if empty and not keep_empty_classes and label_from == "class":
        folders = [name for name in folders if files[name]]
        notes.append(
            f"left out {len(empty)} empty class folder(s): {_listed(empty)} "
            "(pass --keep-empty-classes to keep them as classes)"
        )
    elif empty:
        notes.append(f"{len(empty)} folder(s) hold no files: {_listed(empty)}")
    rows = [Row(p, None) for name in folders for p in files[name]]
    if label_from == "class":
        labels = np.repeat(
            np.arange(len(folders), dtype=np.int64), [len(files[n]) for n in folders]
        )
        if len(folders) > 1 and all(_is_int(n) for n in folders):
            notes.append(
                "the class folders are numbers, and classes are numbered in sorted text "
                f"order ({_listed(folders, 4)}), so label i is classes[i], not the folder's "
                "number; pass --label-from-folder int to store the numbers themselves"
            )
        classes: list[str] | None = folders
    else:
        numbers = _folder_numbers(root, folders, label_from)
        labels = np.repeat(numbers, [len(files[n]) for n in folders])
        classes = None
    return Inputs(
        rows=rows,
        values={"label": labels},
        classes=classes,
        kind="folder",
        extra={"label_from_folder": label_from},
        notes=notes,
    )


def _is_int(name: str) -> bool:
    try:
        int(name)
    except ValueError:
        return False
    return True


def _folder_numbers(root: Path, folders: list[str], label_from: LabelFrom) -> NDArray[Any]:
    """Each folder's name as a number (``--label-from-folder int|float``)."""
    parse = int if label_from == "int" else float
    bad = []
    values: list[float] = []
    for name in folders:
        try:
            values.append(parse(name))
        except ValueError:
            bad.append(name)
    if bad:
        raise PackError(
            f"{root}: --label-from-folder {label_from} reads each folder's name as a number, "
            f"and {_listed(bad)} is not one; rename them, or use --label-from-folder class"
        )
    if label_from == "int":
        try:
            return np.asarray(values, np.int64)
        except OverflowError:
            raise PackError(f"{root}: a folder's number does not fit in int64") from None
    return np.asarray(values, np.float32)


def _listed(names: list[str], most: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")


def read_csv(path: Path, mask_column: str | None) -> Inputs:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            lines = [(r, n) for r, n in _csv_rows(f) if any(c.strip() for c in r)]
    except UnicodeDecodeError as exc:
        raise PackError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except csv.Error as exc:
        raise PackError(f"{path}: not a readable CSV: {exc}") from None
    if not lines:
        raise PackError(f"{path}: empty; a CSV needs a header row and one row per sample")
    header = [c.strip() for c in lines[0][0]]
    if len(set(header)) != len(header):
        raise PackError(f"{path}: repeated column names in the header {header}")
    path_col = next((c for c in PATH_COLUMNS if c in header), None)
    if path_col is None:
        raise PackError(
            f"{path}: no image path column; name one of {list(PATH_COLUMNS)} (columns: {header})"
        )
    if mask_column is not None and mask_column not in header:
        raise PackError(f"{path}: no mask column {mask_column!r} (columns: {header})")
    body = lines[1:]
    if not body:
        raise PackError(f"{path}: a header but no rows; nothing to pack")
    for r, n in body:
        if len(r) != len(header):
            raise PackError(f"{path} line {n}: {len(r)} cells, the header has {len(header)}")
    targets = [c for c in header if c not in (path_col, mask_column)]
    for c in targets:
        if c in ("image", "mask") or c.lower() == "index":
            raise PackError(
                f"{path}: column {c!r} clashes with a field batchd names itself; rename it"
            )
        try:
            FieldSpec(
                name=c, dtype=np.dtype("<f4"), shape=(), role="value", encoding="raw", channels=None
            )
        except ValueError as exc:
            raise PackError(f"{path}: column {c!r} cannot be a field name: {exc}") from None
    base = path.parent
    rows: list[Row] = []
    for r, n in body:
        cell = dict(zip(header, (x.strip() for x in r), strict=True))
        if not cell[path_col]:
            raise PackError(f"{path} line {n}: empty {path_col!r} cell")
        mask = None
        if mask_column is not None:
            if not cell[mask_column]:
                raise PackError(f"{path} line {n}: empty mask cell in {mask_column!r}")
            mask = base / cell[mask_column]
        rows.append(Row(base / cell[path_col], mask, f"line {n}"))
    values: dict[str, NDArray[Any]] = {}
    for c in targets:
        j = header.index(c)
        values[c] = _numeric_column(path, c, [(r[j].strip(), n) for r, n in body])
    extra = {"path_column": path_col, "mask_column": mask_column, "targets": targets}
    return Inputs(rows=rows, values=values, classes=None, kind="csv", extra=extra)


def _csv_rows(f: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """Each row with the line it starts on (a quoted cell may span several lines)."""
    reader = csv.reader(f)
    start = 1
    for r in reader:
        yield r, start
        start = reader.line_num + 1


def _numeric_column(path: Path, name: str, cells: list[tuple[str, int]]) -> NDArray[Any]:
    try:
        return np.asarray([int(s) for s, _ in cells], np.int64)
    except (ValueError, OverflowError):
        pass
    out = np.empty(len(cells), np.float32)
    for i, (s, n) in enumerate(cells):
        try:
            out[i] = float(s)
        except ValueError:
            raise PackError(
                f"{path} line {n}: column {name!r} holds {s!r}, not a number; "
                "targets must be numeric (drop the column or encode it as numbers)"
            ) from None
    return out


# --------------------------------------------------------------------------- Python inputs


def _default_role(name: str, dtype: np.dtype[Any], shape: tuple[int, ...] | None) -> Role:
    if shape is None:
        return "mask" if name == "mask" else "image"
    if name == "image" and dtype == np.uint8 and len(shape) == 3 and shape[2] in (1, 3):
        return "image"
    if name == "mask" and dtype == np.uint8 and len(shape) == 2:
        return "mask"
    return "value"


def spec_for(
    name: str, dtype: np.dtype[Any], shape: tuple[int, ...] | None, role: Role | None
) -> FieldSpec:
    r = role or _default_role(name, dtype, shape)
    if shape is None:
        channels: int | None = 1 if r == "mask" else 3
        enc: Literal["raw", "image"] = "image"
    else:
        channels = None if r == "value" else (1 if r == "mask" else shape[-1])
        enc = "raw"
    try:
        return FieldSpec(
            name=name, dtype=dtype, shape=shape, role=r, encoding=enc, channels=channels
        )
    except ValueError as exc:
        raise PackError(str(exc)) from None


def dtype_of(name: str, value: Any) -> np.dtype[Any]:
    if isinstance(value, bool):
        return np.dtype("|b1")
    if isinstance(value, int):
        return np.dtype("<i8")
    if isinstance(value, float):
        return np.dtype("<f4")  # Python floats as targets: float32, what training uses
    dt = np.asarray(value).dtype
    if dt.kind not in "biuf":
        raise PackError(
            f"field {name!r}: {dt} values cannot be packed; use numbers or bytes of an image"
        )
    return le_dtype(dt)


def check_labels(labels: NDArray[Any], n_classes: int, start: int) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise PackError(
            f"label of sample {start + i} is {labels[i]}, "
            f"outside 0..{n_classes - 1} for {n_classes} classes"
        )


def convert_sample(
    i: int, sample: Mapping[str, Any], fields: list[FieldSpec]
) -> dict[str, Any] | str:
    """A sample in the writer's terms, or a str reason if an image does not decode.

    Raises PackError if the sample is malformed.
    """
    if set(sample) != {f.name for f in fields}:
        raise PackError(
            f"sample {i} has fields {sorted(sample)}, "
            f"the first sample {sorted(f.name for f in fields)}"
        )
    out: dict[str, Any] = {}
    for f in fields:
        v = sample[f.name]
        if f.encoding == "image":
            if not isinstance(v, bytes | bytearray | memoryview):
                raise PackError(
                    f"sample {i} field {f.name!r}: expected image bytes, got {type(v).__name__}"
                )
            img = decode_image(v, f.channels or 3, mask=f.role == "mask")
            if img is None:
                kind = "image" if f.channels == 3 else "single-channel 8-bit mask"
                return f"field {f.name!r}: the bytes are not a decodable {kind}"
            out[f.name] = Encoded(bytes(v), img.shape[0], img.shape[1])
            continue
        arr = np.asarray(v)
        if arr.shape != f.shape:
            raise PackError(
                f"sample {i} field {f.name!r}: shape {arr.shape}, the first sample {f.shape}"
            )
        if arr.dtype.kind not in "biuf" or not np.can_cast(arr.dtype, f.dtype, "same_kind"):
            raise PackError(f"sample {i} field {f.name!r}: {arr.dtype} does not cast to {f.dtype}")
        out[f.name] = arr.astype(f.dtype, copy=False)
    return out
