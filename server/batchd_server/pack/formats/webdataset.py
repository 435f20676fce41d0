"""WebDataset tar shards: members grouped into samples by key, fields by extension.

A shard is a tar (or ``.tar.gz``), its members read by :mod:`._tar`. As
WebDataset groups them, a member's *key* is its path up to the first dot of its
basename and the rest is its *extension* (``train/000017.seg.png``: key
``train/000017``, extension ``seg.png``); consecutive members with one key are one
sample. Extensions (lower-cased) become fields:

==========================  ===============================================
extension                   field
==========================  ===============================================
``jpg jpeg png webp``       ``image`` (decoded with ``--mode raw``)
``X.jpg`` ... ``X.webp``    ``X`` (``mask.png``: the image's mask)
``cls``, ``X.cls``          ``label``, ``X``: an int (decimal text)
``json``                    each numeric entry (or list of numbers), by its key
``npy``, ``X.npy``          ``array``, ``X`` (``np.load(allow_pickle=False)``)
anything else (``txt``)     left out, with a note
==========================  ===============================================

``--field NAME=KEY`` picks by extension (or a json entry's key): ``--field label=cls``.
A member that does not read (a tar cut short), a ``cls`` that is not a number, an image
that does not decode: each names the shard and the member; a corrupt tar header names
its byte and the member before it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import PackError
from ..packer import PackOptions, PackSummary
from ..stream import Record, pack_records
from ._fields import SourceBase, check_shapes_used, choose, field_name, reshaped, shape_for
from ._tar import members

__all__ = ["pack_source", "split_key"]

_IMAGE = frozenset({"jpg", "jpeg", "png", "webp"})


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's ``(key, extension)`` of a member path: split at the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _default_name(ext: str) -> str:
    last = ext.rsplit(".", 1)[-1]
    if ext in _IMAGE:
        return "image"
    if ext == "cls":
        return "label"
    if ext == "npy":
        return "array"
    return field_name(ext[: -len(last) - 1]) if "." in ext else field_name(ext)


def _kind(ext: str) -> str | None:
    last = ext.rsplit(".", 1)[-1]
    if last in _IMAGE:
        return "image"
    if last in ("cls", "json", "npy"):
        return last
    return None


def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes], str | None, str]]:
    """(key, {extension: bytes}, error, the member that names it), one per consecutive key;
    the member is the sample's image if it has one."""
    key: str | None = None
    parts: dict[str, bytes] = {}
    member = ""
    for name, data, error in members(shard):
        k, ext = split_key(name)
        ext = ext.lower()
        if error is not None:
            if key is not None and parts and k != key:  # the sample before is whole
                yield key, parts, None, member
            yield k, {}, error, name
            return
        assert data is not None
        if k != key:
            if key is not None:
                yield key, parts, None, member
            key, parts, member = k, {}, name
        if ext in parts:
            raise PackError(
                f"{shard}: two members {k}.{ext} in one sample; WebDataset keys are unique "
                "within a shard (and a sample's members are consecutive)"
            )
        parts[ext] = data
        if _kind(ext) == "image" and _kind(split_key(member)[1].lower()) != "image":
            member = name
    if key is not None and parts:
        yield key, parts, None, member


class _Source(SourceBase):
    kind = "webdataset"

    def _values(self, parts: dict[str, bytes], where: str) -> dict[str, Any]:
        """Every source key of a sample (extensions, json entries) to its value."""
        out: dict[str, Any] = {}
        for ext, data in parts.items():
            kind = _kind(ext)
            if kind == "image":
                out[ext] = data
            elif kind == "cls":
                try:
                    out[ext] = np.int64(int(data.decode("utf-8").strip()))
                except (UnicodeDecodeError, ValueError):
                    raise ValueError(f"{ext}: {data[:20]!r} is not an integer label") from None
            elif kind == "npy":
                try:
                    out[ext] = np.load(io.BytesIO(data), allow_pickle=False)
                except (ValueError, OSError, EOFError) as exc:
                    raise ValueError(f"{ext}: not a numeric .npy array: {exc}") from None
            elif kind == "json":
                try:
                    obj = json.loads(data)
                except (UnicodeDecodeError, ValueError) as exc:
                    raise ValueError(f"{ext}: not JSON: {exc}") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{ext}: a JSON {type(obj).__name__}, not an object")
                for k, v in obj.items():
                    arr = np.asarray(v) if not isinstance(v, str | dict) else None
                    if arr is not None and arr.dtype.kind in "biuf":
                        out[k] = v if arr.ndim == 0 else arr
        return out

    def _setup(self, values: dict[str, Any], parts: dict[str, bytes], where: str) -> None:
        left = sorted(ext for ext in parts if _kind(ext) is None)
        if left:
            self.notes.append(f"left out the members with extensions {left} (not packed)")
        if self.opts.fields:
            names, notes = choose(list(values), self.opts, where)
        else:
            names, notes = {}, []
            for key in values:
                name = _default_name(key) if key in parts else field_name(key)
                clash = [k for k, n in names.items() if n == name]
                if clash:
                    raise PackError(
                        f"{where}: {clash[0]!r} and {key!r} would both be field {name!r}; "
                        f"pick with --field NAME=KEY (e.g. --field {name}={key})"
                    )
                names[key] = name
        check_shapes_used(names, self.opts, where)
        self.notes.extend(notes)
        self.extra["fields"] = {n: k for k, n in names.items()}
        self.names = names

    def records(self) -> Iterator[Record]:
        for shard in self.paths:
            for key, parts, error, member in _samples(shard):
                where = f"{shard}: sample {key!r} ({member})"
                if error is not None:
                    yield Record(where, {}, error)
                    continue
                try:
                    values = self._values(parts, where)
                except ValueError as exc:
                    yield Record(where, {}, str(exc))
                    continue
                if self.names is None:
                    self._setup(values, parts, where)
                assert self.names is not None
                out = {}
                for k, name in self.names.items():
                    if k not in values:
                        continue
                    v = values[k]
                    target = shape_for(name, k, self.opts)
                    if target is not None and not isinstance(v, bytes):
                        v = np.asarray(v).reshape(reshaped(name, np.shape(v), target, where))
                    out[name] = v
                yield Record(where, out)


def pack_source(paths: list[Path], out: Path, opts: PackOptions) -> PackSummary:
    """Pack WebDataset tar shards (see the module docstring)."""
    return pack_records(out, _Source(paths, opts), opts)
