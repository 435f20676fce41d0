"""The packer: image folders, CSVs, numpy arrays and sample iterables into a dataset.

Images are decoded in a thread pool (OpenCV releases the GIL), in blocks, and
written in input order as each block completes, so memory holds a few blocks,
never the dataset. Everything that can be checked before decoding (empty input,
missing columns, non-numeric targets, bad options) is, so a long pack does not
fail at the end for a reason it could have given at the start.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from ..errors import ConfigError, PackError
from ..format import HEADER_NAME, DatasetWriter, FieldSpec, Role, le_dtype, open_dataset
from ..format.header import _FIELD_NAME, RESERVED
from ..progress import human_bytes, progress_bar
from .decode import Block, Job, Mode, Policy, decode_block, probe_size
from .sources import (
    Inputs,
    LabelFrom,
    check_labels,
    convert_sample,
    dtype_of,
    read_csv,
    scan_folder,
    spec_for,
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

OnError = Literal["stop", "skip"]


@dataclass(frozen=True, kw_only=True)
class PackOptions:
    """How to pack image inputs (folders, CSVs). Validated on creation (ConfigError).

    ``size`` is (height, width) for ``mode="raw"``; None takes the first image's size
    and refuses images of another size. ``channels`` is 3 (RGB) or 1 (grey, served
    ``HxWx1``). ``on_error="skip"`` leaves out files that do not decode, but fails the
    pack (keeping nothing) once more than ``max_skipped`` are: a share such as
    ``"1%"`` of the inputs, or a count. ``label_from_folder`` and
    ``keep_empty_classes`` apply to folder trees (see :func:`pack_folder`).
    ``progress`` None means: a bar when stderr is a TTY. ``workers`` None means one
    decode thread per core.

    The other formats (:mod:`batchd_server.pack.formats`) also read ``fields``
    (``--field NAME=KEY``: take only these arrays, features or columns, KEY stored as
    field NAME; none means all of them, named after their keys) and ``feature_shapes``
    (``--feature-shape NAME=28,28,1``: reshape each sample of that field, e.g. raw bytes).
    """

    mode: Mode = "raw"
    size: tuple[int, int] | None = None
    resize_policy: Policy = "resize"
    channels: int = 3
    on_error: OnError = "stop"
    max_skipped: int | str = "1%"
    label_from_folder: LabelFrom = "class"
    keep_empty_classes: bool = False
    overwrite: bool = False
    workers: int | None = None
    progress: bool | None = None
    block: int = 128
    fields: tuple[tuple[str, str], ...] = ()
    feature_shapes: tuple[tuple[str, tuple[int, ...]], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in ("raw", "encoded"):
            raise ConfigError(f"mode {self.mode!r}: use raw or encoded")
        if self.resize_policy not in ("resize", "center-crop", "letterbox"):
            raise ConfigError(
                f"resize_policy {self.resize_policy!r}: use resize, center-crop or letterbox"
            )
        if self.on_error not in ("stop", "skip"):
            raise ConfigError(f"on_error {self.on_error!r}: use stop or skip")
        if self.channels not in (1, 3):
            raise ConfigError(f"channels {self.channels!r}: use 3 (RGB) or 1 (grey)")
        if self.label_from_folder not in ("class", "int", "float"):
            raise ConfigError(
                f"label_from_folder {self.label_from_folder!r}: use class, int or float"
            )
        skip_limit(self.max_skipped, 0)  # ConfigError now, not when the first file fails
        if self.size is not None:
            if self.mode != "raw":
                raise ConfigError(
                    "size (--size) applies to mode raw only; "
                    "encoded mode keeps every image's own size"
                )
            if len(self.size) != 2 or not all(
                isinstance(d, int) and 0 < d <= 65535 for d in self.size
            ):
                raise ConfigError(f"size {self.size!r}: give (height, width), each 1..65535")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers {self.workers}: at least 1")
        if self.block < 1:
            raise ConfigError(f"block {self.block}: at least 1")
        names = [name for name, _ in self.fields]
        keys = [key for _, key in self.fields]
        for name in names:
            if not _FIELD_NAME.match(name) or name in RESERVED:
                raise ConfigError(
                    f"--field {name}=...: a field name is a letter or _, then letters, digits "
                    f"or _ (at most 64), and not {sorted(RESERVED)}"
                )
        for label, given in (("name", names), ("key", keys)):
            twice = sorted({x for x in given if given.count(x) > 1})
            if twice:
                raise ConfigError(f"--field: the {label} {twice[0]!r} is given twice")
        for name, shape in self.feature_shapes:
            if not shape or not all(isinstance(d, int) and d > 0 for d in shape):
                raise ConfigError(
                    f"--feature-shape {name}={shape!r}: give positive sizes such as 28,28,1"
                )


def _field_summary(f: FieldSpec) -> str:
    """``name (kind, role)`` of one field, for :class:`PackSummary`."""
    if f.encoding == "image":
        kind = "encoded " + ("RGB" if f.channels == 3 else "gray")
    else:
        kind = f"{f.dtype} {f.shape}"
    return f"{f.name} ({kind}, {f.role})"


@dataclass(frozen=True, kw_only=True)
class PackSummary:
    """What a pack produced; ``str()`` is the one-paragraph summary the CLI prints."""

    path: Path
    count: int
    fields: dict[str, FieldSpec]
    bytes: int
    fingerprint: str
    skipped: list[dict[str, Any]]
    seconds: float
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        fields = ", ".join(_field_summary(f) for f in self.fields.values())
        rate = self.count / self.seconds if self.seconds > 0 else float("inf")
        text = (
            f"Packed {self.count:,} samples into {self.path} "
            f"in {self.seconds:.1f} s ({rate:,.0f}/s). "
            f"Fields: {fields}. {human_bytes(self.bytes)} on disk. Fingerprint {self.fingerprint}. "
        )
        text += "".join(f"Note: {n}. " for n in self.notes)
        if not self.skipped:
            return text + "Nothing skipped."
        shown = "; ".join(f"{s['source']}: {s['reason']}" for s in self.skipped[:5])
        more = (
            f" and {len(self.skipped) - 5} more (batchd inspect --json lists all)"
            if len(self.skipped) > 5
            else ""
        )
        return text + f"Skipped {len(self.skipped)}: {shown}{more}."


def skip_limit(max_skipped: int | str, total: int) -> int:
    """How many of ``total`` inputs may be skipped: ``max_skipped`` is a count or ``"N%"``."""
    text = str(max_skipped).strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1])
            if not 0 <= share <= 100:
                raise ValueError
            return int(share / 100 * total + 1e-9)
        if isinstance(max_skipped, bool):
            raise ValueError
        count = int(text)
        if count < 0:
            raise ValueError
        return count
    except ValueError:
        raise ConfigError(
            f"max_skipped {max_skipped!r}: give a share of the inputs such as 1% or a count "
            "such as 10"
        ) from None


class _SkipBudget:
    """Counts skipped inputs; the pack fails once more than ``max_skipped`` are.

    With the total known (folders, CSVs, ``pack_samples(total=)``) it fails at the
    first skip too many; a share of an unknown total is checked at the end (``check``).
    """

    def __init__(self, max_skipped: int | str, total: int | None) -> None:
        skip_limit(max_skipped, 0)  # a bad spec: ConfigError before any work
        self.spec, self.total = max_skipped, total
        self.share = str(max_skipped).strip().endswith("%")
        self.count = 0
        self.first = ""

    def add(self, where: str, reason: str) -> None:
        self.count += 1
        self.first = self.first or f"{where}: {reason}"
        if self.total is not None or not self.share:
            self.check(self.total or 0)

    def check(self, total: int) -> None:
        limit = skip_limit(self.spec, total)
        if self.count > limit:
            raise PackError(
                f"{self.count} of {total if self.total is not None or self.share else 'the'} "
                f"inputs failed, more than --max-skipped {self.spec} allows ({limit}); nothing "
                f"was written. The first: {self.first}. Fix or remove the bad files, or raise "
                "--max-skipped (e.g. --max-skipped 10%) to pack the rest"
            )


def _summary(path: Path, started: float, notes: Sequence[str] = ()) -> PackSummary:
    with open_dataset(path) as ds:
        size = sum(p.stat().st_size for p in path.iterdir())
        return PackSummary(
            path=path,
            count=ds.count,
            fields=dict(ds.fields),
            bytes=size,
            fingerprint=ds.fingerprint,
            skipped=list(ds.header["skipped"]),
            seconds=time.perf_counter() - started,
            notes=tuple(notes),
        )


def _packing(kind: str, source: object, started: float, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "source": None if source is None else str(source),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "seconds": round(time.perf_counter() - started, 3),
        **extra,
    }


# --------------------------------------------------------------------------- image inputs


def _pack_inputs(out: Path, inputs: Inputs, source: Path, opts: PackOptions) -> PackSummary:
    import cv2

    started = time.perf_counter()
    rows = inputs.rows
    masks = any(r.mask is not None for r in rows)
    size, by_first = opts.size, False
    if opts.mode == "raw" and size is None:
        size, by_first = probe_size(rows, opts.channels), True
    job = Job(opts.mode, size, by_first, opts.resize_policy, masks, opts.channels)
    budget = _SkipBudget(opts.max_skipped, len(rows))
    fields = _image_fields(job)
    for name, arr in inputs.values.items():
        fields.append(
            FieldSpec(
                name=name, dtype=arr.dtype, shape=(), role="value", encoding="raw", channels=None
            )
        )
    workers = opts.workers or os.cpu_count() or 1
    threads = cv2.getNumThreads()
    # Parallelism comes from our threads; OpenCV's own pool on top only oversubscribes the cores.
    cv2.setNumThreads(1)
    bar = progress_bar(len(rows), "pack", "img", opts.progress)
    try:
        with (
            DatasetWriter(out, fields, classes=inputs.classes, overwrite=opts.overwrite) as writer,
            ThreadPoolExecutor(workers, thread_name_prefix="batchd-pack") as pool,
        ):
            pending: deque[tuple[int, Future[Block]]] = deque()
            starts = iter(range(0, len(rows), opts.block))
            try:
                for start in starts:
                    pending.append(
                        (start, pool.submit(decode_block, rows[start : start + opts.block], job))
                    )
                    # A bounded window: decode ahead of the writer, never the whole input in RAM.
                    if len(pending) >= 2 * workers:
                        bar.update(_write_block(writer, inputs, *pending.popleft(), opts, budget))
                while pending:
                    bar.update(_write_block(writer, inputs, *pending.popleft(), opts, budget))
            except BaseException:
                for _, fut in pending:
                    fut.cancel()
                raise
            extra = {
                "mode": opts.mode,
                "size": None if size is None else list(size),
                "size_from": "first image" if by_first else ("--size" if size else None),
                "resize_policy": opts.resize_policy if opts.mode == "raw" else None,
                "channels": opts.channels,
                "on_error": opts.on_error,
                "max_skipped": str(opts.max_skipped) if opts.on_error == "skip" else None,
                **inputs.extra,
                "notes": inputs.notes,
            }
            writer.commit(_packing(inputs.kind, source, started, **extra))
    finally:
        bar.close()
        cv2.setNumThreads(threads)
    return _summary(writer.out, started, inputs.notes)


def _image_fields(job: Job, name: str = "image") -> list[FieldSpec]:
    u1 = np.dtype("u1")
    if job.mode == "encoded":
        out = [
            FieldSpec(
                name=name,
                dtype=u1,
                shape=None,
                role="image",
                encoding="image",
                channels=job.channels,
            )
        ]
        if job.masks:
            out.append(
                FieldSpec(
                    name="mask", dtype=u1, shape=None, role="mask", encoding="image", channels=1
                )
            )
        return out
    assert job.size is not None
    h, w = job.size
    c = job.channels
    out = [
        FieldSpec(name=name, dtype=u1, shape=(h, w, c), role="image", encoding="raw", channels=c)
    ]
    if job.masks:
        out.append(
            FieldSpec(name="mask", dtype=u1, shape=(h, w), role="mask", encoding="raw", channels=1)
        )
    return out


def _write_block(
    writer: DatasetWriter,
    inputs: Inputs,
    start: int,
    fut: Future[Block],
    opts: PackOptions,
    budget: _SkipBudget,
) -> int:
    """Write one decoded block in input order; returns how many inputs it covered."""
    b = fut.result()
    k = len(b.ok)
    for j in sorted(b.errors):
        row = inputs.rows[start + j]
        if j == b.mismatch:  # the source's sizes differ: skipping would drop them all
            raise PackError(f"{row.name()}: {b.errors[j]}")
        if opts.on_error == "stop":
            raise PackError(
                f"{row.name()}: {b.errors[j]}. "
                "Fix or remove it, or pass --on-error skip to pack the rest"
            )
        budget.add(row.name(), b.errors[j])
        writer.skip(str(row.image), b.errors[j], start + j)
    keep = np.flatnonzero(b.ok)
    if keep.size == 0:
        return k
    block: dict[str, Any] = {}
    if opts.mode == "raw":
        block["image"] = b.images if keep.size == k else b.images[keep]
        if b.masks is not None:
            block["mask"] = b.masks if keep.size == k else b.masks[keep]
    else:
        block["image"] = [b.images[j] for j in keep]
        if b.masks is not None:
            block["mask"] = [b.masks[j] for j in keep]
    for name, arr in inputs.values.items():
        block[name] = arr[start : start + k][keep]
    writer.append_block(block, int(keep.size))
    return k


def pack_folder(
    source: str | Path, out: str | Path, *, options: PackOptions | None = None
) -> PackSummary:
    """An image-folder tree (one subfolder per class) into fields ``image`` and ``label``.

    ``label`` is the class index (int64, ``classes`` in sorted order; empty folders
    are left out unless ``keep_empty_classes``), or with ``label_from_folder`` ``"int"``
    or ``"float"`` the folder's name read as a number (int64 or float32, no classes).
    OS litter (hidden files, ``Thumbs.db``, ``desktop.ini``, ``@eaDir``) is never read.
    """
    src = Path(source)
    if not src.is_dir():
        raise PackError(f"{src}: not a directory")
    opts = options or PackOptions()
    _check_out(Path(out), src, opts.overwrite)
    inputs = scan_folder(
        src, label_from=opts.label_from_folder, keep_empty_classes=opts.keep_empty_classes
    )
    return _pack_inputs(Path(out), inputs, src, opts)


def pack_csv(
    source: str | Path,
    out: str | Path,
    *,
    mask_column: str | None = None,
    options: PackOptions | None = None,
) -> PackSummary:
    """A CSV: an image path column, an optional mask column, other columns numeric targets."""
    src = Path(source)
    opts = options or PackOptions()
    _check_out(Path(out), src, opts.overwrite)
    return _pack_inputs(Path(out), read_csv(src, mask_column), src, opts)


def pack(
    source: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    mask_column: str | None = None,
    options: PackOptions | None = None,
    fmt: str | None = None,
) -> PackSummary:
    """Pack what ``batchd pack SOURCE... OUT`` is given: a folder tree, a ``.csv``, or the
    files of another format (``.npy``/``.npz``, TFRecord, WebDataset tar, Parquet, HDF5).

    ``source`` is a path, a glob or brace pattern (``shard-{000..009}.tar``), or a list
    of them; ``fmt`` names the format when the file names do not tell
    (:func:`batchd_server.pack.formats.detect`; ``batchd pack --list-formats``).
    """
    from .formats import detect, expand, pack_format

    opts = options or PackOptions()
    paths = expand(source)
    name = fmt or detect(paths)
    if name not in ("folder", "csv"):
        if mask_column is not None:
            raise ConfigError(f"--mask-column applies to a CSV source, not {name}")
        if opts.label_from_folder != "class" or opts.keep_empty_classes:
            raise ConfigError(
                f"--label-from-folder and --keep-empty-classes apply to an image folder, not {name}"
            )
        return pack_format(name, paths, Path(out), opts)
    if len(paths) != 1:
        raise PackError(f"give one {name} source, not {len(paths)}: {[str(p) for p in paths]}")
    if opts.fields or opts.feature_shapes:
        raise ConfigError(
            f"--field and --feature-shape apply to array and record formats, not a {name}"
        )
    src = paths[0]
    if name == "folder":
        if mask_column is not None:
            raise ConfigError("--mask-column applies to a CSV source, not an image folder")
        return pack_folder(src, out, options=opts)
    if opts.label_from_folder != "class" or opts.keep_empty_classes:
        raise ConfigError(
            "--label-from-folder and --keep-empty-classes apply to an image folder, not a "
            "CSV: a CSV's targets are its columns"
        )
    return pack_csv(src, out, mask_column=mask_column, options=opts)


def _check_out(out: Path, source: Path, overwrite: bool) -> None:
    o, s = out.absolute(), source.absolute()
    if source.is_dir() and (o == s or s in o.parents):
        # Inside the tree it would be scanned as a class folder on the next pack.
        raise PackError(f"{out}: the output must not be the source or inside it")
    if (o.exists() or o.is_symlink()) and not overwrite:
        raise PackError(f"{out} already exists; pass --overwrite to replace it")
    if (
        o.exists()
        and overwrite
        and not (o / HEADER_NAME).exists()
        and o.is_dir()
        and any(o.iterdir())
    ):
        raise PackError(f"{out} exists and is not a batchd dataset; refusing to replace it")


# --------------------------------------------------------------------------- Python inputs


def pack_arrays(
    out: str | Path,
    arrays: Mapping[str, NDArray[Any]],
    *,
    roles: Mapping[str, Role] | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> PackSummary:
    """Pack equal-length arrays (``np.memmap`` is fine: read in chunks) as raw fields.

    A uint8 ``image`` (N, H, W, 3) gets role image and a uint8 ``mask`` (N, H, W)
    role mask unless ``roles`` says otherwise; everything else is a value.
    """
    return pack_columns(
        out, arrays, roles=roles, classes=classes, overwrite=overwrite, progress=progress
    )


def pack_columns(
    out: str | Path,
    arrays: Mapping[str, Any],
    *,
    roles: Mapping[str, Role] | None = None,
    classes: Sequence[str] | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
    kind: str = "arrays",
    source: object = None,
    notes: Sequence[str] = (),
    extra: Mapping[str, Any] | None = None,
) -> PackSummary:
    """:func:`pack_arrays` for anything array-like: ``shape``, ``dtype`` and slicing by rows.

    The array readers (``.npy``/``.npz``, HDF5) hand their memory maps, zip-member
    streams or ``h5py`` datasets here; rows are read in 8 MiB slices, in order.
    """
    started = time.perf_counter()
    if not arrays:
        raise PackError("pack_arrays: no arrays given")
    lengths = {}
    fields = []
    for name, arr in arrays.items():
        if not hasattr(arr, "shape") or not hasattr(arr, "dtype") or len(arr.shape) < 1:
            raise PackError(f"array {name!r}: needs an array with a first (sample) axis")
        lengths[name] = arr.shape[0]
        if arr.dtype.kind not in "biuf":
            raise PackError(f"array {name!r}: dtype {arr.dtype} cannot be packed (numbers only)")
        fields.append(
            spec_for(
                name,
                le_dtype(arr.dtype),
                tuple(int(d) for d in arr.shape[1:]),
                (roles or {}).get(name),
            )
        )
    if len(set(lengths.values())) != 1:
        raise PackError(f"arrays differ in length: {lengths}")
    n = next(iter(lengths.values()))
    if n == 0:
        raise PackError("pack_arrays: the arrays are empty; nothing to pack")
    row_bytes = max(sum(f.dtype.itemsize * int(np.prod(f.shape or ())) for f in fields), 1)
    step = max(1, (8 << 20) // row_bytes)
    bar = progress_bar(n, "pack", "sample", progress)
    try:
        with DatasetWriter(out, fields, classes=classes, overwrite=overwrite) as writer:
            for start in range(0, n, step):
                block = {
                    f.name: np.ascontiguousarray(arrays[f.name][start : start + step], f.dtype)
                    for f in fields
                }
                if classes is not None and "label" in block:
                    check_labels(block["label"], len(classes), start)
                writer.append_block(block, min(step, n - start))
                bar.update(min(step, n - start))
            writer.commit(
                _packing(kind, source, started, **(extra or {}), notes=list(notes))
                if kind != "arrays"
                else _packing(kind, source, started)
            )
    finally:
        bar.close()
    return _summary(writer.out, started, notes)


def pack_samples(
    out: str | Path,
    samples: Iterable[Mapping[str, Any]],
    *,
    roles: Mapping[str, Role] | None = None,
    classes: Sequence[str] | None = None,
    on_error: OnError = "stop",
    max_skipped: int | str = "1%",
    overwrite: bool = False,
    progress: bool | None = None,
    total: int | None = None,
) -> PackSummary:
    """Pack samples from any iterable, one at a time (streamed, never all in RAM).

    Each sample maps field name to a value: an array or number (a raw field, its
    shape and dtype fixed by the first sample) or the ``bytes`` of a JPEG/PNG (an
    encoded field, checked to decode). ``on_error="skip"`` leaves out images that
    do not decode (recorded in the header), and fails the pack, keeping nothing, when
    more than ``max_skipped`` were (a count, or a share such as ``"1%"`` of the samples
    seen, checked as they come when ``total`` is given and at the end otherwise).
    Shape or key mismatches always stop.
    """
    started = time.perf_counter()
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error {on_error!r}: use stop or skip")
    budget = _SkipBudget(max_skipped, total)
    it = iter(samples)
    first = next(it, None)
    if first is None:
        raise PackError("pack_samples: the iterable yielded no samples; nothing to pack")
    fields = []
    for name, v in first.items():
        if isinstance(v, bytes | bytearray | memoryview):
            fields.append(spec_for(name, np.dtype("u1"), None, (roles or {}).get(name)))
        else:
            fields.append(
                spec_for(name, dtype_of(name, v), tuple(np.shape(v)), (roles or {}).get(name))
            )
    bar = progress_bar(total or 0, "pack", "sample", progress)
    try:
        with DatasetWriter(out, fields, classes=classes, overwrite=overwrite) as writer:
            for i, sample in enumerate(_chain(first, it)):
                conv = convert_sample(i, sample, fields)
                if isinstance(conv, str):
                    if on_error == "stop":
                        raise PackError(f"sample {i}: {conv}; fix it or pass on_error='skip'")
                    budget.add(f"sample {i}", conv)
                    writer.skip(f"sample {i}", conv, i)
                else:
                    if classes is not None and "label" in conv:
                        check_labels(np.asarray(conv["label"])[None], len(classes), i)
                    writer.append(conv)
                bar.update(1)
            budget.check(i + 1)
            writer.commit(_packing("samples", None, started, on_error=on_error))
    finally:
        bar.close()
    return _summary(writer.out, started)


def _chain(
    first: Mapping[str, Any], rest: Iterator[Mapping[str, Any]]
) -> Iterator[Mapping[str, Any]]:
    yield first
    yield from rest
