"""Fill a batch body from a pack: the per-chunk work the engine runs on its threads.

:func:`filler` returns ``fill(a, b)``, which writes rows ``a..b`` of a batch into the
body's field views; chunks are independent, so a batch is split over threads freely.

While the dataset holds a read lease (``Dataset.mapped``: no one can then truncate the
pack, so reading the mapping cannot SIGBUS) raw fields are read from the memory map;
otherwise with ``preadv``. A pack bigger than the memory budget has its big fields, raw
or encoded, read past the page cache instead: a chunk's samples all in flight at once
(``Dataset.staged``, :func:`staged_rows`), each augmented as soon as it has arrived.

* Raw fields with no ops, or flips only: each field's rows are gathered straight into
  the body (``np.take`` from the mapping, or ``preadv`` in runs of consecutive ids),
  then flipped in place.
* Any other pipeline: each sample is loaded and augmented into its row. Raw fields are
  views of the mapping, or a ``preadv`` copy into a scratch row; encoded fields are
  decoded from the mapping, or from a ``preadv`` copy.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from batchd.wire import Layout, layout

from ..augment import Pipeline
from ..format import Dataset

if TYPE_CHECKING:
    from .request import BatchRequest

__all__ = ["body_layout", "filler", "row_bytes", "row_chunks", "walks_alone"]

_MIN_ROWS_PER_CHUNK = 8  # below this, splitting a batch costs more than it saves
_COPY_LOOP = threading.Lock()
"""Held by a thread walking the samples of a copy-only pipeline over raw fields.

Each sample there is a few µs of Python and one copy that releases the GIL. Two threads
walking samples at once hand the GIL to each other at every sample: measured on 2 cores,
257 context switches per batch of 256 and a third of the server's CPU in the scheduler,
for fewer images/s than one thread. So one thread at a time walks such samples; the
other threads serve everything else (decodes, resizes, the event loop).
"""
Fields = dict[str, tuple[np.dtype[Any], tuple[int, ...]]]


def body_layout(
    req: BatchRequest,
    fingerprint: str,
    rows: int,
    fields: Fields,
    alloc: Callable[[int], NDArray[np.uint8]] | None,
) -> Layout:
    """The body of ``req``'s batch (``rows`` samples of ``fields``), laid out by batchd.wire."""
    return layout(
        dataset=req.dataset,
        fingerprint=fingerprint,
        epoch=req.epoch,
        batch=req.k,
        rows=rows,
        fields=fields,
        alloc=alloc,
    )


def row_bytes(fields: Fields) -> int:
    """Body bytes per sample: its sample id and every output field."""
    return 8 + sum(dt.itemsize * math.prod(shape) for dt, shape in fields.values())


def row_chunks(rows: int, parts: int) -> list[tuple[int, int]]:
    """``rows`` split into at most ``parts`` ranges of at least a few rows each."""
    parts = max(1, min(parts, rows // _MIN_ROWS_PER_CHUNK or 1))
    bounds = [rows * i // parts for i in range(parts + 1)]  # as even as integers allow
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


@contextlib.contextmanager
def staged_rows(
    ds: Dataset, ids: NDArray[np.int64]
) -> Iterator[Callable[[int, int], dict[str, NDArray[Any]]]]:
    """``load(k, i)``: every field of sample ``i = ids[k]``, its direct reads in flight.

    Every direct read of ``ids`` is submitted at once (one ``io_submit`` per field),
    before the caller takes the copy lock or decodes; ``load`` waits for sample ``k``'s
    own reads only, so each sample is used as soon as it has arrived. The other fields
    (labels, small rows) are read from the page cache. Encoded fields come back decoded.
    """
    specs, direct = ds.fields, set(ds.direct_fields)
    with contextlib.ExitStack() as stack:
        staged = {
            name: stack.enter_context(ds.staged(name, ids)) for name in specs if name in direct
        }
        scratch = {
            name: np.empty(spec.shape or (), spec.dtype)
            for name, spec in specs.items()
            if name not in direct and spec.encoding == "raw"
        }

        def field(name: str, k: int, i: int) -> NDArray[Any]:
            spec = specs[name]
            st = staged.get(name)
            if spec.encoding != "raw":
                return ds.image(name, i) if st is None else ds.decode(name, i, st.row(k))
            if st is None:
                return ds.read_row(name, i, scratch[name])
            return st.row(k).view(spec.dtype).reshape(spec.shape or ())

        yield lambda k, i: {name: field(name, k, i) for name in specs}


def _mapped_images(ds: Dataset, names: list[str]) -> Callable[[str, int], NDArray[Any]]:
    """``image(name, i)``: encoded sample ``i`` decoded straight from the pack's mapping
    (inside a :meth:`Dataset.mapped` block only). No bytes copied out and no system call:
    a ``preadv`` into a fresh buffer was about 5% of a gather thread's time here."""
    stored = {name: ds.stored(name) for name in names}

    def image(name: str, i: int) -> NDArray[Any]:
        data, offsets = stored[name]
        return ds.decode(name, i, data[offsets[i] : offsets[i + 1]])

    return image


def walks_alone(ds: Dataset, pipeline: Pipeline) -> bool:
    """True when one thread at a time walks the samples of ``pipeline`` over ``ds``
    (``_COPY_LOOP``): splitting such a batch into row chunks gains nothing."""
    specs = ds.fields
    return (
        all(s.encoding == "raw" for s in specs.values())
        and pipeline.copies_only(specs)
        and not (not pipeline.ops or pipeline.flips_only(specs))  # those are gathered whole
    )


def filler(
    ds: Dataset,
    pipeline: Pipeline,
    ids: NDArray[np.int64],
    seed: int,
    epoch: int,
    out: dict[str, NDArray[Any]],
) -> Callable[[int, int], None]:
    """``fill(a, b)``: rows ``a..b`` of the batch of samples ``ids`` into ``out``."""
    specs = ds.fields
    all_raw = all(s.encoding == "raw" for s in specs.values())
    if all_raw and (not pipeline.ops or pipeline.flips_only(specs)):

        def gather(a: int, b: int) -> None:
            with ds.mapped() as mapped:
                for name, view in out.items():
                    if mapped:  # mode="clip" writes into out without a buffered copy
                        np.take(ds.array(name), ids[a:b], axis=0, out=view[a:b], mode="clip")
                    else:
                        ds.read_rows(name, ids[a:b], view[a:b])
            if pipeline.ops:  # flips only: mirror the stored rows where they now lie
                pipeline.flip_in_place(ids, seed, epoch, out, range(a, b), fields=specs)

        return gather

    raw = [name for name, spec in specs.items() if spec.encoding == "raw"]
    encoded = [name for name in specs if name not in raw]
    serial = _COPY_LOOP if walks_alone(ds, pipeline) else contextlib.nullcontext()

    def run(a: int, b: int) -> None:
        with ds.mapped() as mapped:
            row: Callable[[str, int], NDArray[Any]]
            if mapped and not encoded:  # straight from the mapping, no per-sample load
                arrays = {name: ds.array(name) for name in raw}
                with serial:
                    pipeline.run_arrays(arrays, ids, seed, epoch, out, range(a, b), fields=specs)
                return
            image: Callable[[str, int], NDArray[Any]] = ds.image
            if mapped:  # views of the mapping: no copy at all
                maps = {name: np.asarray(ds.array(name)) for name in raw}  # not np.memmap
                row = lambda name, i: maps[name][i]  # noqa: E731
                image = _mapped_images(ds, encoded)
            elif ds.direct_fields:
                # Each row waits for its own reads only: the copies follow the disk.
                with staged_rows(ds, ids[a:b]) as staged, serial:
                    pipeline.run(
                        lambda r: staged(r - a, int(ids[r])),
                        ids, seed, epoch, out, range(a, b), fields=specs,
                    )  # fmt: skip
                return
            else:
                # One scratch row per raw field: Pipeline.run consumes each loaded
                # sample before it loads the next, so the buffer can be reused.
                scratch = {
                    name: np.empty(spec.shape, spec.dtype)
                    for name, spec in specs.items()
                    if spec.encoding == "raw" and spec.shape is not None
                }
                row = lambda name, i: ds.read_row(name, i, scratch[name])  # noqa: E731

            def load(r: int) -> dict[str, NDArray[Any]]:
                i = int(ids[r])
                sample = {name: row(name, i) for name in raw}
                sample.update((name, image(name, i)) for name in encoded)
                return sample

            with serial:
                pipeline.run(load, ids, seed, epoch, out, range(a, b), fields=specs)

    return run
