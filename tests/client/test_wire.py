"""The batch body: generic msgpack readers decode it; the client's decoder is zero-copy
and strict.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from batchd import WireError
from batchd.wire import ALIGN, decode_batch, layout


def _filled(rows: int = 4) -> np.ndarray:
    out = layout(
        dataset="shapes",
        fingerprint="ab" * 16,
        epoch=3,
        batch=7,
        rows=rows,
        fields={"image": ("u1", (5, 6, 3)), "label": ("i8", ()), "target": ("f4", (2,))},
    )
    out.index[:] = np.arange(rows) * 10
    out.fields["image"][:] = np.arange(rows * 90, dtype=np.uint8).reshape(rows, 5, 6, 3)
    out.fields["label"][:] = np.arange(rows) % 3
    out.fields["target"][:] = 0.5
    return out.body


def test_generic_msgpack_reader_decodes_the_layout() -> None:
    body = _filled()
    top = msgpack.unpackb(body.tobytes())
    assert (top["v"], top["dataset"], top["epoch"], top["batch"]) == (1, "shapes", 3, 7)
    image = top["fields"]["image"]
    assert image["dtype"] == "|u1" and image["shape"] == [4, 5, 6, 3]
    assert np.frombuffer(image["data"], np.uint8)[:3].tolist() == [0, 1, 2]
    assert np.frombuffer(top["index"]["data"], "<i8").tolist() == [0, 10, 20, 30]


def test_decode_round_trips_without_copying() -> None:
    body = _filled()
    batch = decode_batch(body)
    assert batch.index.tolist() == [0, 10, 20, 30]
    assert batch.fields["label"].tolist() == [0, 1, 2, 0]
    assert batch.fields["target"].dtype == np.float32 and batch.fields["target"].shape == (4, 2)
    image = batch.fields["image"]
    assert image.shape == (4, 5, 6, 3)
    assert np.shares_memory(image, body)  # a view, not a copy
    assert image.flags.writeable
    assert (image.ctypes.data - body.ctypes.data) % ALIGN == 0


def test_decode_of_read_only_bytes_gives_read_only_arrays() -> None:
    batch = decode_batch(_filled().tobytes())
    assert not batch.fields["image"].flags.writeable


def test_empty_batch_and_no_fields() -> None:
    out = layout(dataset="d", fingerprint="f", epoch=0, batch=0, rows=0, fields={})
    batch = decode_batch(out.body)
    assert batch.index.shape == (0,) and batch.fields == {}


def test_layout_refuses_dtypes_that_cannot_cross_the_wire() -> None:
    with pytest.raises(ValueError, match="cannot cross the wire"):
        layout(dataset="d", fingerprint="f", epoch=0, batch=0, rows=1, fields={"x": ("O", ())})


def _body(top: dict[str, object]) -> bytes:
    return msgpack.packb(top, use_bin_type=True)


def _valid_top() -> dict[str, object]:
    return {
        "v": 1,
        "dataset": "d",
        "fingerprint": "f",
        "epoch": 0,
        "batch": 0,
        "index": {"dtype": "<i8", "shape": [2], "data": np.arange(2, dtype="<i8").tobytes()},
        "fields": {"x": {"dtype": "<f4", "shape": [2, 3], "data": bytes(24)}},
    }


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda t: t.update(v=2), "protocol version"),
        (lambda t: t.pop("fingerprint"), "fingerprint"),
        (lambda t: t["fields"]["x"].update(dtype="O"), "not allowed"),
        (lambda t: t["fields"]["x"].update(dtype=">f4"), "not allowed"),
        (lambda t: t["fields"]["x"].update(shape=[2, 4]), "bytes"),
        (lambda t: t["fields"]["x"].update(shape=[2, -3]), "non-negative"),
        (lambda t: t["fields"]["x"].update(shape=[3, 2]), "rows"),
        (lambda t: t["fields"]["x"].update(data="text"), "not a bin"),
        (lambda t: t.update(fields=[1]), "fields is not a map"),
        (lambda t: t["index"].update(dtype="<i4", data=bytes(8)), "<i8"),
    ],
)
def test_decode_names_what_is_wrong(mutate: object, message: str) -> None:
    top = _valid_top()
    mutate(top)  # type: ignore[operator]
    with pytest.raises(WireError, match=message):
        decode_batch(_body(top))


def test_truncated_and_trailing_bytes_are_refused() -> None:
    body = _filled().tobytes()
    for cut in (1, 100, len(body) // 2, len(body) - 1):
        with pytest.raises(WireError, match="truncated"):
            decode_batch(body[:cut])
    with pytest.raises(WireError, match="trailing"):
        decode_batch(body + b"\x00")


def test_huge_declared_lengths_fail_cleanly() -> None:
    # a bin32 header claiming 4 GiB inside a tiny body
    with pytest.raises(WireError, match="truncated"):
        decode_batch(b"\x81\xa1x\xc6" + struct.pack(">I", 2**32 - 1) + b"abc")
    with pytest.raises(WireError, match="unsupported msgpack type"):
        decode_batch(b"\xc1")


def test_deep_nesting_is_refused_not_a_recursion_error() -> None:
    with pytest.raises(WireError, match="nesting"):
        decode_batch(b"\x91" * 100_000 + b"\x00")
