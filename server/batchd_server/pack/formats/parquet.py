"""Parquet files, or a folder of them (a Hugging Face dataset's ``data/``), via ``pyarrow``.

Read row group by row group in batches of ``PackOptions.block`` rows
(``ParquetFile.iter_batches``), with page checksums verified where the writer stored
them, so memory holds a batch, never the file. Columns become fields:

=======================================  =======================================
column                                   field
=======================================  =======================================
struct ``{bytes, path}`` (HF ``Image``)  the image (its ``bytes``)
binary holding JPEG/PNG/WebP             the image
other binary                             raw uint8 (``--feature-shape`` reshapes)
integer, float, bool                     a target (int64 / float32 / bool)
list of numbers (one length)             an array target
string and anything else                 left out, with a note
=======================================  =======================================

A ``ClassLabel`` column (in the Hugging Face metadata the ``datasets`` library writes
into the schema, key ``huggingface``) gives the pack its ``classes``. A row group that
does not read (a corrupt page, a bad checksum) names the file and the row group: its
rows are errors (``--on-error skip`` records each).

A ``datasets`` ``save_to_disk`` folder (``state.json`` beside Arrow stream files) is read
the same way, each Arrow file memory-mapped, batch by batch; a batch that does not read
stops the pack (an Arrow stream has no index to find the next one). A ``DatasetDict``
folder is refused with its splits' folders named.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import PackError
from ..packer import PackOptions, PackSummary
from ..stream import Record, pack_records
from . import require
from ._fields import SourceBase, check_shapes_used, choose, reshaped, shape_for
from .tfrecord import is_image

__all__ = ["pack_source"]


def _files(paths: list[Path]) -> list[Path]:
    """The Parquet files of ``paths`` (folders at any depth), or a ``save_to_disk``
    folder's Arrow files (listed in its ``state.json``)."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir() and (p / "dataset_dict.json").exists():
            splits = sorted(q.name for q in p.iterdir() if (q / "state.json").exists())
            raise PackError(
                f"{p}: a DatasetDict saved with save_to_disk; pack one split's folder "
                f"({', '.join(str(p / s) for s in splits) or 'e.g. train/'})"
            )
        if p.is_dir() and (p / "state.json").exists():
            try:
                state = json.loads((p / "state.json").read_text(encoding="utf-8"))
                out.extend(p / f["filename"] for f in state["_data_files"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise PackError(f"{p / 'state.json'}: not a datasets state file: {exc}") from None
        elif p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.suffix in (".parquet", ".pq"))  # any depth
            if not found:
                raise PackError(f"{p}: a folder with no .parquet files")
            out.extend(found)
        else:
            out.append(p)
    if len({q.suffix == ".arrow" for q in out}) > 1:
        raise PackError("the sources mix Parquet and Arrow files; pack one kind at a time")
    return out


def _kind(pa: Any, typ: Any) -> str | None:
    """How a column's type is packed: image-struct, binary, number, list, or None (left out)."""
    t = pa.types
    if t.is_struct(typ) and typ.get_field_index("bytes") >= 0:
        return "image-struct"
    if t.is_binary(typ) or t.is_large_binary(typ) or t.is_fixed_size_binary(typ):
        return "binary"
    if t.is_integer(typ) or t.is_floating(typ) or t.is_boolean(typ):
        return "number"
    if (t.is_list(typ) or t.is_large_list(typ) or t.is_fixed_size_list(typ)) and (
        t.is_integer(typ.value_type) or t.is_floating(typ.value_type)
    ):
        return "list"
    return None


class _Source(SourceBase):
    kind = "parquet"

    def __init__(self, paths: list[Path], opts: PackOptions) -> None:
        super().__init__(paths, opts)
        self.pa = require("parquet", "pyarrow")
        self.pq = require("parquet", "pyarrow.parquet")
        self.files = _files(paths)
        self.arrow = self.files[0].suffix == ".arrow"
        self.source = ", ".join(str(p) for p in self.files)
        if self.arrow:  # an Arrow stream does not say how many rows it holds up front
            schema = self._open(self.files[0]).schema
        else:
            self.total = sum(self._open(f).metadata.num_rows for f in self.files)
            schema = self._open(self.files[0]).schema_arrow
        kinds = {n: _kind(self.pa, schema.field(n).type) for n in schema.names}
        where = str(self.files[0])
        if not self.opts.fields:
            left = [n for n, k in kinds.items() if k is None]
            if left:
                self.notes.append(f"left out the columns {left} (not numbers or images)")
            kinds = {n: k for n, k in kinds.items() if k is not None}
        names, notes = choose(list(kinds), opts, where)
        for key in names:
            if kinds[key] is None:
                raise PackError(
                    f"{where}: column {key!r} is {schema.field(key).type}; batchd packs numbers, "
                    "lists of numbers, binary and images"
                )
        check_shapes_used(names, opts, where)
        self.notes.extend(notes)
        self.names = names
        self.kinds = {k: kinds[k] for k in names}
        self.schema = schema
        self.extra["fields"] = {n: k for k, n in names.items()}
        self.classes = self._classes(schema, names)
        self.images: set[str] = {k for k, kind in self.kinds.items() if kind == "image-struct"}
        self.sniffed = False

    def _open(self, path: Path) -> Any:
        try:
            if self.arrow:
                return self.pa.ipc.open_stream(self.pa.memory_map(str(path)))
            return self.pq.ParquetFile(path, page_checksum_verification=True)
        except (OSError, self.pa.ArrowException) as exc:
            what = "Arrow stream (save_to_disk)" if self.arrow else "Parquet file"
            raise PackError(f"{path}: not a readable {what}: {exc}") from None

    def _classes(self, schema: Any, names: dict[str, str]) -> list[str] | None:
        meta = (schema.metadata or {}).get(b"huggingface")
        if meta is None:
            return None
        try:
            features = json.loads(meta)["info"]["features"]
        except (ValueError, KeyError, TypeError):
            self.notes.append("the schema's Hugging Face metadata does not parse; no classes")
            return None
        labels = {
            k: f["names"]
            for k, f in features.items()
            if isinstance(f, dict) and f.get("_type") == "ClassLabel" and k in names
        }
        if not labels:
            return None
        key = "label" if "label" in labels else sorted(labels)[0]
        if len(labels) > 1:
            self.notes.append(f"several ClassLabel columns {sorted(labels)}: classes from {key!r}")
        if names[key] != "label":
            self.notes.append(f"classes are column {key!r}'s (field {names[key]!r})")
        return [str(c) for c in labels[key]]

    def _columns(self, batch: Any) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {}
        assert self.names is not None
        for key in self.names:
            col = batch.column(key)
            kind = self.kinds[key]
            if kind == "image-struct":
                out[key] = col.field("bytes").to_pylist()
            elif kind == "binary":
                vals = col.to_pylist()
                if not self.sniffed and vals and vals[0] is not None and is_image(vals[0]):
                    self.images.add(key)
                out[key] = vals
            elif kind == "number":
                arr = col.to_numpy(zero_copy_only=False)
                valid = col.is_valid().to_numpy(zero_copy_only=False)
                out[key] = [v if ok else None for v, ok in zip(arr, valid, strict=True)]
            else:
                out[key] = [None if v is None else np.asarray(v) for v in col.to_pylist()]
        self.sniffed = True
        return out

    def _value(self, key: str, name: str, v: Any) -> Any:
        if self.kinds[key] in ("image-struct", "binary") and key in self.images:
            return bytes(v)
        arr = np.frombuffer(v, np.uint8) if isinstance(v, bytes) else v
        target = shape_for(name, key, self.opts)
        if target is None:
            return arr
        return np.asarray(arr).reshape(reshaped(name, np.shape(arr), target, key))

    def _rows(self, batch: Any, at: tuple[str, str], row: int) -> Iterator[Record]:
        """One batch's records; ``row`` is the file's row number of its first, and a
        record is named ``at[0] + its row + at[1]``."""
        assert self.names is not None
        cols = self._columns(batch)
        for i in range(batch.num_rows):
            where = f"{at[0]}{row + i}{at[1]}"
            nulls = [k for k in self.names if cols[k][i] is None]
            if nulls:
                yield Record(where, {}, f"column {nulls[0]!r} is null")
                continue
            yield Record(
                where,
                {name: self._value(key, name, cols[key][i]) for key, name in self.names.items()},
            )

    def records(self) -> Iterator[Record]:
        for path in self.files:
            if self.arrow:
                yield from self._arrow(path)
            else:
                yield from self._parquet(path)

    def _parquet(self, path: Path) -> Iterator[Record]:
        assert self.names is not None
        pf = self._open(path)
        first = 0
        for rg in range(pf.num_row_groups):
            n = pf.metadata.row_group(rg).num_rows
            at = (f"{path} row ", f" (row group {rg})")
            done = 0
            try:
                for batch in pf.iter_batches(
                    batch_size=self.opts.block, row_groups=[rg], columns=list(self.names)
                ):
                    yield from self._rows(batch, at, first + done)
                    done += batch.num_rows
            except (OSError, self.pa.ArrowException) as exc:
                reason = (
                    f"row group {rg} (rows {first}..{first + n - 1}) does not read: {exc}; "
                    "the file is damaged"
                )
                for i in range(done, n):
                    yield Record(f"{at[0]}{first + i}{at[1]}", {}, reason)
            first += n

    def _arrow(self, path: Path) -> Iterator[Record]:
        assert self.names is not None
        reader = self._open(path)
        row = 0
        k = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except (OSError, self.pa.ArrowException) as exc:
                raise PackError(
                    f"{path}: record batch {k} (from row {row}) does not read: {exc}; the file "
                    "is damaged, and the rows after it cannot be found (nothing was written)"
                ) from None
            batch = batch.select(list(self.names))
            for off in range(0, batch.num_rows, self.opts.block):
                part = batch.slice(off, self.opts.block)
                yield from self._rows(part, (f"{path} row ", f" (record batch {k})"), row + off)
            row += batch.num_rows
            k += 1


def pack_source(paths: list[Path], out: Path, opts: PackOptions) -> PackSummary:
    """Pack Parquet files or folders (see the module docstring)."""
    return pack_records(out, _Source(paths, opts), opts)
