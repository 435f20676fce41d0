"""Streamed records into a pack: what the TFRecord, WebDataset and Parquet readers share.

A reader yields :class:`Record`\\ s one at a time: each maps field names to an image's
encoded ``bytes`` or to an array or number. :func:`pack_records` takes them in blocks
of ``PackOptions.block``, decodes each block's images on the same thread pool as the
folder packer (:func:`~batchd_server.pack.decode.decode_block`: ``--mode``, ``--size``,
``--resize-policy``, ``--channels`` mean what they mean there), and writes the blocks in
order, so memory holds a few blocks, never the source. The first record fixes the
fields; a later record with other fields or shapes stops the pack, naming it.
A record the reader could not read (a bad checksum) or an image that does not decode
is an error (``--on-error stop``, named by :attr:`Record.where`) or skipped and recorded.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError, PackError
from ..format import DatasetWriter, FieldSpec
from ..progress import progress_bar
from .decode import Block, Job, decode_block, probe_size
from .formats._fields import grey_hint, guess_roles
from .packer import PackOptions, PackSummary, _image_fields, _packing, _SkipBudget, _summary
from .sources import Row, check_labels, dtype_of, spec_for

__all__ = ["Record", "RecordSource", "pack_records"]

_MAX_HELD = 256 << 20  # encoded bytes read ahead of the writer, whatever the core count


@dataclass(frozen=True, slots=True)
class Record:
    """One sample as a reader saw it.

    ``where`` names it in messages (``train.tfrecord record 17``). ``values`` maps field
    names to ``bytes`` (an encoded image: JPEG, PNG or WebP) or to an array or number.
    ``error`` says why the reader could not read it (its ``values`` are then empty).
    """

    where: str
    values: dict[str, Any]
    error: str | None = None


class RecordSource(Protocol):
    """What :func:`pack_records` reads: records, and what the pack's header should say."""

    kind: str
    source: str
    total: int | None
    classes: list[str] | None
    notes: list[str]
    extra: dict[str, Any]

    def records(self) -> Iterator[Record]: ...


@dataclass
class _Layout:
    image: str | None
    mask: str | None
    values: list[FieldSpec]
    names: frozenset[str] = field(default_factory=frozenset)


@dataclass
class _Chunk:
    start: int
    records: list[Record]
    errors: dict[int, str]
    decode_at: list[int]  # chunk positions of the records whose images are decoded
    values: dict[str, NDArray[Any] | None]  # only the records not already failed, in order
    good: list[int]  # chunk positions the values arrays hold
    future: Future[Block] | None
    nbytes: int = 0  # the encoded images it holds


def _layout(first: Record, opts: PackOptions) -> _Layout:
    images = [k for k, v in first.values.items() if isinstance(v, bytes)]
    mask = "mask" if "mask" in images else None
    image = [k for k in images if k != "mask"]
    if len(image) > 1:
        raise PackError(
            f"{first.where}: {len(image)} image fields {image}; a pack has one image field "
            f"(and an optional 'mask'): pick one with --field image={image[0]}, or rename a "
            f"mask with --field mask=KEY"
        )
    if mask and not image:
        raise PackError(f"{first.where}: a 'mask' image but no image field to pair it with")
    raw = {
        k: (dtype_of(k, v), tuple(int(d) for d in np.shape(v)))
        for k, v in first.values.items()
        if k not in images
    }
    for k, (_, shape) in raw.items():
        if any(d == 0 for d in shape):
            raise PackError(
                f"{first.where}: field {k!r} is empty (shape {shape}); a field holds at least "
                "one value per sample: leave it out with --field"
            )
    roles = guess_roles(raw)
    if image and any(r == "image" for r in roles.values()):
        for k, r in roles.items():
            if r == "image":
                roles[k] = "value"
    specs = [spec_for(k, dt, sh, roles[k]) for k, (dt, sh) in raw.items()]
    if not image and (opts.size is not None or opts.mode == "encoded"):
        raise ConfigError(
            f"{first.where}: --size and --mode encoded apply to encoded images (JPEG/PNG/WebP), "
            f"and this source holds none (fields {sorted(raw)}); its arrays are packed as they are"
        )
    return _Layout(image[0] if image else None, mask, specs, frozenset(first.values))


def _prepare(chunk: _Chunk, layout: _Layout) -> list[Row]:
    """Check each record against the layout; collect the values and the images to decode."""
    rows: list[Row] = []
    cols: dict[str, list[Any]] = {f.name: [] for f in layout.values}
    for j, rec in enumerate(chunk.records):
        if rec.error is not None:
            chunk.errors[j] = rec.error
            continue
        if set(rec.values) != layout.names:
            raise PackError(
                f"{rec.where}: holds {sorted(rec.values)}, the first record "
                f"{sorted(layout.names)}; every record needs the same fields (pick the common "
                "ones with --field NAME=KEY)"
            )
        for f in layout.values:
            v = np.asarray(rec.values[f.name])
            if isinstance(rec.values[f.name], bytes) or v.shape != f.shape:
                got = "image bytes" if isinstance(rec.values[f.name], bytes) else f"{v.shape}"
                raise PackError(
                    f"{rec.where}: field {f.name!r} has shape {got}, the first record {f.shape}; "
                    "a field has one shape in every record (leave it out with --field, or "
                    "reshape it with --feature-shape)"
                )
            if v.dtype.kind not in "biuf" or not np.can_cast(v.dtype, f.dtype, "same_kind"):
                raise PackError(
                    f"{rec.where}: field {f.name!r} is {v.dtype}, the first record {f.dtype}"
                )
            cols[f.name].append(v)
        chunk.good.append(j)
        if layout.image is not None:
            for name in (layout.image, layout.mask):
                if name is not None and not isinstance(rec.values[name], bytes):
                    raise PackError(
                        f"{rec.where}: field {name!r} is not encoded image bytes, as it is in "
                        "the first record"
                    )
            chunk.decode_at.append(j)
            mask = rec.values[layout.mask] if layout.mask else None
            rows.append(Row(rec.values[layout.image], mask, rec.where))
    chunk.values = {
        f.name: (np.stack(cols[f.name]).astype(f.dtype, copy=False) if cols[f.name] else None)
        for f in layout.values
    }
    return rows


def pack_records(out: Path, src: RecordSource, opts: PackOptions) -> PackSummary:
    """Pack a reader's records into ``out``; see the module docstring."""
    import cv2

    started = time.perf_counter()
    it = src.records()
    head = list(islice(it, opts.block))
    if not head:
        raise PackError(f"{src.source}: no records; nothing to pack")
    first = next((r for r in head if r.error is None), None)
    if first is None:
        raise PackError(
            f"none of the first {len(head)} records reads; the first: {head[0].where}: "
            f"{head[0].error}"
        )
    layout = _layout(first, opts)
    size, by_first = opts.size, False
    if layout.image is not None and opts.mode == "raw" and size is None:
        probe = [
            Row(r.values[layout.image], None, r.where)
            for r in head
            if r.error is None and layout.image in r.values
        ]
        size, by_first = probe_size(probe, opts.channels), True
    job = Job(opts.mode, size, by_first, opts.resize_policy, layout.mask is not None, opts.channels)
    fields = (_image_fields(job, layout.image) if layout.image else []) + layout.values
    notes = src.notes
    if layout.image is None:
        notes = [*notes, *grey_hint({f.name: (f.dtype, f.shape or ()) for f in layout.values})]
    budget = _SkipBudget(opts.max_skipped, src.total)
    workers = opts.workers or os.cpu_count() or 1
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)  # our threads are the parallelism; OpenCV's pool would oversubscribe
    bar = progress_bar(src.total or 0, "pack", "rec", opts.progress)
    seen = 0
    try:
        with (
            DatasetWriter(out, fields, classes=src.classes, overwrite=opts.overwrite) as writer,
            ThreadPoolExecutor(workers, thread_name_prefix="batchd-pack") as pool,
        ):
            pending: deque[_Chunk] = deque()
            held = 0

            def chunks() -> Iterator[list[Record]]:
                yield head
                while more := list(islice(it, opts.block)):
                    yield more

            try:
                for records in chunks():
                    chunk = _Chunk(seen, records, {}, [], {}, [], None)
                    rows = _prepare(chunk, layout)
                    if rows:
                        chunk.future = pool.submit(decode_block, rows, job)
                        chunk.nbytes = sum(len(r.image) for r in rows if isinstance(r.image, bytes))
                    seen += len(records)
                    pending.append(chunk)
                    held += chunk.nbytes
                    # A bounded window, in blocks and in bytes (a record can be a large JPEG).
                    while len(pending) >= 2 * workers or (held > _MAX_HELD and len(pending) > 1):
                        held -= pending[0].nbytes
                        bar.update(_write(writer, pending.popleft(), layout, src, opts, budget))
                while pending:
                    bar.update(_write(writer, pending.popleft(), layout, src, opts, budget))
            except BaseException:
                for c in pending:
                    if c.future is not None:
                        c.future.cancel()
                raise
            budget.check(seen)
            extra = {
                "mode": opts.mode if layout.image else None,
                "size": None if size is None else list(size),
                "size_from": "first image" if by_first else ("--size" if size else None),
                "resize_policy": opts.resize_policy
                if layout.image and opts.mode == "raw"
                else None,
                "channels": opts.channels if layout.image else None,
                "on_error": opts.on_error,
                "max_skipped": str(opts.max_skipped) if opts.on_error == "skip" else None,
                **src.extra,
                "notes": notes,
            }
            writer.commit(_packing(src.kind, src.source, started, **extra))
    finally:
        bar.close()
        cv2.setNumThreads(threads)
    return _summary(writer.out, started, notes)


def _write(
    writer: DatasetWriter,
    chunk: _Chunk,
    layout: _Layout,
    src: RecordSource,
    opts: PackOptions,
    budget: _SkipBudget,
) -> int:
    """Write one chunk in order; returns how many records it covered."""
    k = len(chunk.records)
    ok = np.zeros(k, bool)
    ok[chunk.good] = True
    errors = dict(chunk.errors)
    block = chunk.future.result() if chunk.future is not None else None
    if block is not None:
        for i, j in enumerate(chunk.decode_at):
            if not block.ok[i]:
                if i == block.mismatch:  # the source's sizes differ: skipping would drop them all
                    raise PackError(f"{chunk.records[j].where}: {block.errors[i]}")
                errors[j] = block.errors[i]
                ok[j] = False
    for j in sorted(errors):
        where = chunk.records[j].where
        if opts.on_error == "stop":
            raise PackError(
                f"{where}: {errors[j]}. Fix or remove it, or pass --on-error skip to pack the rest"
            )
        budget.add(where, errors[j])
        writer.skip(where, errors[j], chunk.start + j)
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        return k
    # values hold the records in chunk.good; of those keep the ones whose image decoded
    pos = {j: i for i, j in enumerate(chunk.good)}
    kept = [int(j) for j in keep]
    vi = np.asarray([pos[j] for j in kept], np.intp)
    out: dict[str, Any] = {}
    if block is not None and layout.image is not None:
        di = {j: i for i, j in enumerate(chunk.decode_at)}
        ii = np.asarray([di[j] for j in kept], np.intp)
        if opts.mode == "raw":
            out[layout.image] = block.images[ii]
            if layout.mask:
                out[layout.mask] = block.masks[ii]
        else:
            out[layout.image] = [block.images[i] for i in ii]
            if layout.mask:
                out[layout.mask] = [block.masks[i] for i in ii]
    for f in layout.values:
        arr = chunk.values[f.name]
        assert arr is not None  # kept records hold values
        out[f.name] = arr[vi]
        if src.classes is not None and f.name == "label":
            check_labels(out[f.name], len(src.classes), chunk.start)
    writer.append_block(out, int(keep.size))
    return k
