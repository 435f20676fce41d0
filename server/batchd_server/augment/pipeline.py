"""Declarative augmentation pipelines: parse, type-check against a dataset, run per sample.

A pipeline is a JSON list of ops, ``[{"op": "random_crop", "size": 224}, {"op": "hflip"}]``,
validated at the boundary (:meth:`Pipeline.parse`); no code ever comes from clients.
The ops and their exact semantics are in :mod:`batchd_server.ops`:

=====================  =========================================  =====================
op                     parameters (defaults)                      fields touched
=====================  =========================================  =====================
random_resized_crop    size, scale=[0.08, 1], ratio=[3/4, 4/3]    images, masks
random_crop            size, padding=0                            images, masks
center_crop            size                                       images, masks
resize                 size                                       images, masks
hflip / vflip          p=0.5                                      images, masks
rotate                 degrees, p=1                               images, masks
brightness             delta (fraction of 255)                    images (uint8)
contrast               range [lo, hi]                             images (uint8)
saturation             range [lo, hi]                             images (uint8, RGB)
cutout                 size, p=0.5                                images (masks kept)
normalize              mean, std (per channel; last op)           images -> float32
=====================  =========================================  =====================

``size`` is ``n`` (square) or ``[height, width]``. Geometric ops apply identically to
every image and mask field of a sample (masks nearest-neighbour); ``value`` fields
(labels, ...) are copied unchanged.

Randomness: op ``i`` of the pipeline draws its numbers from
``uniforms(seed, epoch, [sample_id], stream=i, n=op.draws)`` (:mod:`batchd_server.shuffle`),
so a sample's augmentation depends only on (seed, epoch, sample id, op position), never
on batch size, rank split, row split or thread count (invariant 4).

Prefer uint8 output and normalising on the GPU: float32 is 4x the bytes on the wire.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import cv2
import numpy as np
from numpy.typing import NDArray

from ..errors import PipelineError
from ..shuffle import uniforms
from .ops import (
    LINEAR_DTYPES,
    NO_WARP_DTYPES,
    HFlip,
    Normalize,
    Op,
    VFlip,
    parse_op,
)
from .rows import Norm, normalize_into, put_values, write_row
from .sample import Sample
from .windows import Windows, windows_only

__all__ = ["FieldLike", "Pipeline"]

Array = NDArray[Any]
Load = Callable[[int], Mapping[str, Array]]
ROLES = ("image", "mask", "value")
MAX_OPS = 64


class FieldLike(Protocol):
    """What a pipeline needs to know of a dataset field (format.FieldSpec fits).

    ``shape`` is the per-sample shape, ``None`` (or ``None`` entries for height/width)
    when samples vary in size, e.g. encoded JPEGs; then an optional ``channels``
    attribute gives the channel count.
    """

    @property
    def role(self) -> str: ...

    @property
    def dtype(self) -> Any: ...

    @property
    def shape(self) -> tuple[int | None, ...] | None: ...


@dataclass(frozen=True)
class _Plan:
    """A pipeline bound to one dataset's fields: who is image/mask/value, final shapes."""

    images: tuple[str, ...]
    masks: tuple[str, ...]
    values: tuple[str, ...]
    #: name -> output shape as OpenCV sees it (trailing channel axis of 1 dropped).
    cv_shapes: dict[str, tuple[int, ...]]
    shapes: dict[str, tuple[int, ...]]
    #: image name -> (uint8 lookup table or None, scale, offset) when the pipeline ends
    #: with normalize: out = x * scale - offset.
    normalize: dict[str, Norm]
    #: height and width shared by every image/mask field, when fixed.
    source_hw: tuple[int, int] | None


def _fixed(n: int | None) -> int | None:
    return None if n is None else int(n)


class Pipeline:
    """A validated, immutable augmentation pipeline. Equal specs give equal ``canonical``."""

    __slots__ = ("_plans", "_windows_only", "canonical", "ops")

    ops: tuple[Op, ...]
    canonical: str

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = tuple(ops)
        self.canonical = json.dumps(
            [{"op": op.name, **op.params()} for op in self.ops],
            sort_keys=True,
            separators=(",", ":"),
        )
        self._plans: dict[tuple[Any, ...], _Plan] = {}
        self._windows_only = windows_only(self.ops)

    @classmethod
    def parse(cls, spec: Sequence[Mapping[str, Any]] | str) -> Pipeline:
        """Validate a pipeline given as a list of op objects or its JSON text."""
        if isinstance(spec, str | bytes):
            try:
                spec = json.loads(spec)
            except (ValueError, RecursionError) as exc:
                raise PipelineError(f"pipeline is not valid JSON: {exc}") from None
        if not isinstance(spec, list | tuple):
            raise PipelineError(
                'a pipeline is a JSON list of ops like [{"op": "hflip"}], '
                f"got {type(spec).__name__}"
            )
        if len(spec) > MAX_OPS:
            raise PipelineError(f"a pipeline has at most {MAX_OPS} ops, got {len(spec)}")
        ops = [parse_op(i, raw) for i, raw in enumerate(spec)]
        for op in ops[:-1]:
            if isinstance(op, Normalize):
                raise op.error("normalize must be the last op (it turns images into float32)")
        return cls(ops)

    @property
    def digest(self) -> str:
        """sha256 of ``canonical``, hex: a stable id for registering the pipeline."""
        return hashlib.sha256(self.canonical.encode()).hexdigest()

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and other.canonical == self.canonical

    def __hash__(self) -> int:
        return hash(self.canonical)

    def __repr__(self) -> str:
        return f"Pipeline({self.canonical})"

    # --- typing against a dataset ------------------------------------------------------

    def output_fields(
        self, fields: Mapping[str, FieldLike]
    ) -> dict[str, tuple[np.dtype[Any], tuple[int, ...]]]:
        """Per-sample output (dtype, shape) of every field; PipelineError if it cannot work."""
        plan = self._plan(fields)
        out: dict[str, tuple[np.dtype[Any], tuple[int, ...]]] = {}
        for name, field in fields.items():
            dtype = np.dtype(field.dtype)
            if name in plan.normalize:
                dtype = np.dtype(np.float32)
            out[name] = (dtype, plan.shapes[name])
        return out

    def _plan(self, fields: Mapping[str, FieldLike]) -> _Plan:
        key = tuple(
            (
                name,
                f.role,
                np.dtype(f.dtype).str,
                None if f.shape is None else tuple(f.shape),
                getattr(f, "channels", None),
            )
            for name, f in fields.items()
        )
        plan = self._plans.get(key)
        if plan is None:
            plan = self._build(fields)
            if len(self._plans) < 64:  # a pipeline meets few datasets; bound it anyway
                self._plans[key] = plan
        return plan

    def _build(self, fields: Mapping[str, FieldLike]) -> _Plan:
        images: list[str] = []
        masks: list[str] = []
        values: list[str] = []
        shapes: dict[str, tuple[int, ...]] = {}
        geo: dict[str, tuple[int | None, int | None, tuple[int, ...]]] = {}
        for name, field in fields.items():
            role = field.role
            if role not in ROLES:
                raise PipelineError(
                    f"field {name!r} has role {role!r}; roles are {', '.join(ROLES)}"
                )
            shape = field.shape
            if role == "value":
                if shape is None or any(d is None for d in shape):
                    raise PipelineError(
                        f"value field {name!r} has a variable shape and cannot be batched"
                    )
                values.append(name)
                shapes[name] = tuple(int(d) for d in shape)  # type: ignore[arg-type]
                continue
            (images if role == "image" else masks).append(name)
            if shape is None:
                # One shape per role whatever the storage: an encoded mask is HxW like a
                # raw one, an encoded image HxWxC (issue 16).
                channels = getattr(field, "channels", None) or 3
                geo[name] = (None, None, () if role == "mask" else (int(channels),))
            elif len(shape) in (2, 3) and all(d is not None for d in shape[2:]):
                geo[name] = (_fixed(shape[0]), _fixed(shape[1]), tuple(int(d) for d in shape[2:]))  # type: ignore[arg-type]
            else:
                raise PipelineError(
                    f"{role} field {name!r} must be HxW or HxWxC, got shape {shape}"
                )
        hw = source_hw = self._check_geometry(geo)
        for op in self.ops:
            hw = op.out_size(hw)
        normalize: dict[str, Norm] = {}
        last = self.ops[-1] if self.ops else None
        for name, (h, w, chans) in geo.items():
            self._check_dtypes(name, np.dtype(fields[name].dtype), chans, name in masks)
            size = (
                hw
                if any(op.geometric for op in self.ops)
                else (None if h is None or w is None else (h, w))
            )
            if size is None:
                raise PipelineError(
                    f"field {name!r} has a variable size, so a batch would not have one shape: "
                    "add resize, center_crop or random_resized_crop with a size",
                    param="size",
                )
            shapes[name] = (*size, *chans)
            if isinstance(last, Normalize) and name in images:
                dtype = np.dtype(fields[name].dtype)
                scale, offset = last.coefficients(dtype)
                table = None
                if dtype == np.uint8 and (not chans or chans[0] <= 4):
                    ramp = np.arange(256, dtype=np.float32)[:, None]
                    table = (ramp * scale - offset).astype(np.float32)
                    if chans and chans[0] > 1:
                        table = np.ascontiguousarray(
                            np.broadcast_to(table, (256, chans[0]))
                        ).reshape(256, 1, chans[0])
                    else:
                        table = table[:, :1].copy()
                normalize[name] = (table, scale, offset)
        cv_shapes = {
            n: s[:2] if len(s) == 3 and s[2] == 1 and n in geo else s for n, s in shapes.items()
        }
        return _Plan(
            tuple(images), tuple(masks), tuple(values), cv_shapes, shapes, normalize, source_hw
        )

    def _check_geometry(
        self, geo: Mapping[str, tuple[int | None, int | None, tuple[int, ...]]]
    ) -> tuple[int, int] | None:
        sizes = {(h, w) for h, w, _ in geo.values()}
        if (
            len(sizes) > 1
            and any(op.geometric for op in self.ops)
            and all(None not in s for s in sizes)
        ):
            raise PipelineError(
                "geometric ops need every image and mask field to have the same height and width, "
                f"got {', '.join(f'{n}: {h}x{w}' for n, (h, w, _) in geo.items())}"
            )
        if len(sizes) == 1:
            ((h, w),) = sizes
            if h is not None and w is not None:
                return h, w
        return None

    def _check_dtypes(
        self, name: str, dtype: np.dtype[Any], chans: tuple[int, ...], mask: bool
    ) -> None:
        c = chans[0] if chans else 1
        for op in self.ops:
            if mask:
                if op.name == "rotate" and dtype in NO_WARP_DTYPES:
                    raise op.error(
                        f"mask field {name!r} is {dtype}, which OpenCV cannot rotate; "
                        "store masks as uint8"
                    )
                continue
            if op.resamples and dtype not in LINEAR_DTYPES:
                raise op.error(
                    f"image field {name!r} is {dtype}; resampling needs one of "
                    f"{', '.join(sorted(d.name for d in LINEAR_DTYPES))}"
                )
            if op.uint8_only and dtype != np.uint8:
                raise op.error(f"needs uint8 images, field {name!r} is {dtype}")
            if op.name == "saturation" and c != 3:
                raise op.error(f"needs 3-channel RGB images, field {name!r} has {c} channel(s)")
            if isinstance(op, Normalize):
                if dtype == np.bool_:
                    raise op.error(f"cannot normalize bool field {name!r}")
                for param in ("mean", "std"):
                    n = len(getattr(op, param))
                    if n not in (1, c):
                        raise op.error(
                            f"{param} has {n} values; field {name!r} has {c} channel(s)", param
                        )

    # --- running -------------------------------------------------------------------------

    def copies_only(self, fields: Mapping[str, FieldLike]) -> bool:
        """True when :meth:`run` is one crop window + flip copy per sample (no resampling,
        no colour op): over raw fields its cost is the copy itself, the memory's speed."""
        return self._windows_only and self._plan(fields).source_hw is not None

    def flips_only(self, fields: Mapping[str, FieldLike]) -> bool:
        """True when every op is a flip and the images and masks have one fixed size.

        The batch can then be gathered as stored (one read per run of ids, straight into
        the body) and flipped where it lies (:meth:`flip_in_place`): for small images
        that per-batch path is several times cheaper than walking the samples.
        """
        return (
            bool(self.ops)
            and all(isinstance(op, HFlip | VFlip) for op in self.ops)
            and self._plan(fields).source_hw is not None
        )

    def _windows(
        self, hw: tuple[int, int], rows_ids: NDArray[np.int64], seed: int, epoch: int
    ) -> Windows:
        """The crop windows and flips of a windows-only pipeline for these samples."""
        draws = [
            uniforms(seed, epoch, rows_ids, stream=op.index, n=op.draws) if op.draws else None
            for op in self.ops
        ]
        return Windows.compute(self.ops, hw, draws, len(rows_ids))

    def flip_in_place(
        self,
        ids: NDArray[np.int64],
        seed: int,
        epoch: int,
        out: Mapping[str, Array],
        rows: range,
        *,
        fields: Mapping[str, FieldLike],
    ) -> None:
        """Flip rows ``rows`` of ``out``, which hold the samples ``ids`` as stored.

        The twin of :meth:`run` for :meth:`flips_only` pipelines (a test pins the bytes
        equal): the same draws decide the same flips.
        """
        plan = self._plan(fields)
        assert plan.source_hw is not None, "flip_in_place needs flips_only()"
        rows_ids = np.asarray(ids)[rows.start : rows.stop : rows.step]
        codes = self._windows(plan.source_hw, rows_ids, seed, epoch).flip_codes()
        targets = [(out[name], plan.cv_shapes[name]) for name in plan.images + plan.masks]
        where = np.arange(rows.start, rows.stop, rows.step)
        # One pass per flip code, not a Python call per row: the rows to flip are copied
        # out together, stacked into one tall image and mirrored by one cv2.flip (a
        # horizontal flip mirrors every row of pixels, so every stacked sample at once);
        # a vertical flip reverses each sample's rows with numpy. Then copied back.
        for code in (1, 0, -1):
            sel = where[codes == code]
            if not sel.size:
                continue
            for buf, shape in targets:
                block = buf[sel].reshape(len(sel), shape[0], -1)
                if code != 1:
                    block = np.ascontiguousarray(block[:, ::-1])
                if code != 0:
                    tall = block.reshape(len(sel) * shape[0], *shape[1:])
                    if cv2.flip(tall, 1, dst=tall) is not tall:
                        raise AssertionError("cv2.flip did not write in place")
                buf[sel] = block.reshape(buf[sel].shape)

    def run(
        self,
        load: Load,
        ids: NDArray[np.int64],
        seed: int,
        epoch: int,
        out: Mapping[str, Array],
        rows: range,
        *,
        fields: Mapping[str, FieldLike],
    ) -> None:
        """Augment rows ``rows`` of a batch into ``out``.

        ``load(r)`` returns the source arrays of sample ``ids[r]`` (memmap views or
        decoded images; never written to). ``out[name]`` is the batch buffer of every
        field, shaped ``(batch, *output_fields(fields)[name][1])``; row ``r`` gets the
        result. Rows are independent: split a batch over threads however you like.
        """
        plan = self._plan(fields)
        rows_ids = np.asarray(ids)[rows.start : rows.stop : rows.step]
        if self.copies_only(fields) and (plan.images or plan.masks):
            self._run_windows(plan, load, rows_ids, seed, epoch, out, rows)
        else:
            self._run_general(plan, load, rows_ids, seed, epoch, out, rows)

    def run_arrays(
        self,
        arrays: Mapping[str, Array],
        ids: NDArray[np.int64],
        seed: int,
        epoch: int,
        out: Mapping[str, Array],
        rows: range,
        *,
        fields: Mapping[str, FieldLike],
    ) -> None:
        """:meth:`run` over whole fields: ``arrays[name][i]`` is sample ``i``'s ``name``.

        The same bytes as ``run`` with ``load(r) = {name: arrays[name][ids[r]]}`` (a test
        pins it), but a :meth:`copies_only` pipeline pays no per-sample dict or call: the
        value fields are gathered in one ``np.take`` and each image or mask row is one
        slice and one copy. ``arrays`` should be plain ndarrays: indexing an ``np.memmap``
        runs Python code (``__array_finalize__``) per view, several µs a sample, so they
        are taken as such.
        """
        plan = self._plan(fields)
        if not (self.copies_only(fields) and (plan.images or plan.masks)):

            def load(r: int) -> dict[str, Array]:
                i = int(ids[r])
                return {name: a[i] for name, a in arrays.items()}

            self.run(load, ids, seed, epoch, out, rows, fields=fields)
            return
        assert plan.source_hw is not None
        at = slice(rows.start, rows.stop, rows.step)
        rows_ids = np.asarray(ids)[at]
        for name in plan.values:
            np.take(arrays[name], rows_ids, axis=0, out=out[name][at])
        win = self._windows(plan.source_hw, rows_ids, seed, epoch)
        tops, lefts = win.top.tolist(), win.left.tolist()
        codes = [None if c == 2 else c for c in win.flip_codes().tolist()]
        h, w = win.h, win.w
        sids = rows_ids.tolist()
        for name in plan.images + plan.masks:
            src, buf, shape = arrays[name], out[name], plan.cv_shapes[name]
            if src.shape[1:3] != plan.source_hw:
                raise PipelineError(
                    f"field {name!r} is {src.shape[1:]} per sample, expected "
                    f"{plan.source_hw[0]}x{plan.source_hw[1]} as the dataset declares"
                )
            # Plain ndarray views, a trailing channel of 1 dropped as OpenCV sees it.
            src = np.reshape(np.asarray(src), (len(src), *plan.source_hw, *shape[2:]), copy=False)
            buf = np.reshape(buf, (len(buf), *shape), copy=False)
            norm = plan.normalize.get(name)
            for k, r in enumerate(rows):
                top, left, code = tops[k], lefts[k], codes[k]
                view = src[sids[k], top : top + h, left : left + w]
                if norm is not None:
                    normalize_into(view, buf[r], norm, code)
                elif code is None:
                    buf[r] = view
                elif cv2.flip(view, code, dst=(row := buf[r])) is not row:
                    raise AssertionError("cv2.flip did not write into the batch buffer")

    def _run_general(
        self,
        plan: _Plan,
        load: Load,
        rows_ids: NDArray[np.int64],
        seed: int,
        epoch: int,
        out: Mapping[str, Array],
        rows: range,
    ) -> None:
        """Any pipeline: each sample walks the ops (see sample._Sample)."""
        sids = rows_ids.tolist()
        steps = [
            (op.apply, uniforms(seed, epoch, rows_ids, stream=op.index, n=op.draws).tolist())
            if op.draws
            else (op.apply, None)
            for op in self.ops
            if not isinstance(op, Normalize)
        ]
        values = [(name, plan.shapes[name], out[name]) for name in plan.values]
        geo = plan.images + plan.masks
        finals = [(name, plan.cv_shapes[name], out[name], plan.normalize.get(name)) for name in geo]
        for k, r in enumerate(rows):
            sample = load(r)
            put_values(values, sample, r, sids[k])
            if not geo:
                continue
            arrays: dict[str, Array] = {}
            for name in geo:
                arr = sample[name]
                if arr.ndim == 3 and arr.shape[2] == 1:
                    arr = arr[:, :, 0]
                arrays[name] = arr
            if len(arrays) > 1 and len({a.shape[:2] for a in arrays.values()}) > 1:
                raise PipelineError(
                    f"sample {sids[k]}: image and mask fields differ in size "
                    f"({', '.join(f'{n}: {a.shape}' for n, a in arrays.items())})"
                )
            s = Sample(sids[k], arrays, plan.images, plan.masks)
            for apply, draws in steps:
                apply(s, draws[k] if draws is not None else _NO_DRAWS)
            code = s.flip_code()
            for name, shape, buf, norm in finals:
                arr = s.arrays[name]
                if arr.shape != shape:
                    raise PipelineError(
                        f"sample {sids[k]}: field {name!r} is {arr.shape} after the pipeline but "
                        f"the batch holds {shape}: add resize, center_crop or random_resized_crop "
                        "with a size",
                        param="size",
                    )
                write_row(arr, buf[r], shape, norm, code)

    def _run_windows(
        self,
        plan: _Plan,
        load: Load,
        rows_ids: NDArray[np.int64],
        seed: int,
        epoch: int,
        out: Mapping[str, Array],
        rows: range,
    ) -> None:
        """Crops and flips of fixed-size fields: windows for all rows in one numpy pass,
        then one copy (or cv2.flip) per field from the source view into the batch."""
        assert plan.source_hw is not None
        win = self._windows(plan.source_hw, rows_ids, seed, epoch)
        tops, lefts = win.top.tolist(), win.left.tolist()
        codes = win.flip_codes().tolist()
        h, w = win.h, win.w
        values = [(name, plan.shapes[name], out[name]) for name in plan.values]
        finals = [
            (name, plan.cv_shapes[name], out[name], plan.normalize.get(name))
            for name in plan.images + plan.masks
        ]
        src_hw = plan.source_hw
        sids = rows_ids.tolist()
        for k, r in enumerate(rows):
            sample = load(r)
            put_values(values, sample, r, sids[k])
            top, left, code = tops[k], lefts[k], codes[k]
            for name, shape, buf, norm in finals:
                arr = sample[name]
                if arr.shape[:2] != src_hw:
                    raise PipelineError(
                        f"sample {sids[k]}: field {name!r} is {arr.shape}, expected "
                        f"{src_hw[0]}x{src_hw[1]} as the dataset declares"
                    )
                view = arr[top : top + h, left : left + w]
                write_row(view, buf[r], shape, norm, None if code == 2 else code)


_NO_DRAWS: list[float] = []
