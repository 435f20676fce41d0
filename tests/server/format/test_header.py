"""format/header.py: the header file read back, each refusal named, and FieldSpec's rules.

Headers here are sealed by hand (prefix, JSON, checksum) so each check of
:func:`read_header` is met alone; test_format.py refuses damaged packs end to end.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash

from batchd.wire import ALLOWED_DTYPES
from batchd_server.errors import FormatError
from batchd_server.format.header import (
    BOM,
    FORMAT_VERSION,
    HEADER_NAME,
    MAGIC,
    PREFIX,
    SUFFIX,
    FieldSpec,
    fingerprint_of,
    le_dtype,
    read_header,
)

X = FieldSpec(
    name="x", dtype=np.dtype("<f4"), shape=(2,), role="value", encoding="raw", channels=None
)


def field(**kw: Any) -> FieldSpec:
    """``X`` with some attributes changed, validated again as a new FieldSpec."""
    return dataclasses.replace(X, **kw)


U1 = np.dtype("u1")
VALID = [
    field(),
    field(name="label", dtype=np.dtype("<i8"), shape=()),
    field(name="flag", dtype=np.dtype("|b1"), shape=(3, 4)),
    field(name="image", dtype=U1, shape=(6, 8, 3), role="image", channels=3),
    field(name="grey", dtype=U1, shape=(6, 8, 1), role="image", channels=1),
    field(name="mask", dtype=U1, shape=(6, 8), role="mask", channels=1),
    field(name="jpeg", dtype=U1, shape=None, role="image", encoding="image", channels=3),
    field(name="g", dtype=U1, shape=None, role="image", encoding="image", channels=1),
    field(name="seg", dtype=U1, shape=None, role="mask", encoding="image", channels=1),
]

HEADER: dict[str, Any] = {
    "version": FORMAT_VERSION,
    "count": 2,
    "classes": ["a", "b"],
    "fields": [VALID[1].to_json()],
    "chunk_size": 8,
    "files": {"label.raw": {"size": 16, "xxh3_64": "0" * 16, "chunks": ["0" * 16] * 2}},
    "packing": {"batchd": "test"},
    "skipped": [],
}


def seal(
    folder: Path,
    header: Any = HEADER,
    *,
    magic: bytes = MAGIC,
    version: int = FORMAT_VERSION,
    bom: int = BOM,
    body: bytes | None = None,
) -> Path:
    """Write ``folder/batchd.header`` as the writer does, with any part replaceable."""
    folder.mkdir(exist_ok=True)
    data = json.dumps(header).encode() if body is None else body
    head = PREFIX.pack(magic, version, bom, len(data)) + data
    (folder / HEADER_NAME).write_bytes(head + SUFFIX.pack(xxhash.xxh3_64_intdigest(head)))
    return folder


# ---------------------------------------------------------------- FieldSpec


@pytest.mark.parametrize("spec", VALID, ids=[f.name for f in VALID])
def test_field_spec_json_round_trip(spec: FieldSpec) -> None:
    obj = json.loads(json.dumps(spec.to_json()))
    assert FieldSpec.from_json(obj) == spec
    assert obj["dtype"] == spec.dtype.str  # the byte order is spelt out on disk


def test_field_spec_files() -> None:
    assert VALID[0].files() == ("x.raw",)
    assert VALID[-1].files() == ("seg.data", "seg.offsets", "seg.sizes")


def test_every_wire_dtype_is_a_valid_value_field() -> None:
    for dt in ALLOWED_DTYPES:
        assert field(dtype=np.dtype(dt)).dtype.str == dt


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"name": "9lives"}, "a field name is a letter or _"),
        ({"name": "a" * 65}, "at most 64"),
        ({"name": 3}, "a field name"),
        ({"role": "label"}, "role must be image, mask or value, not 'label'"),
        ({"dtype": np.dtype(">f4")}, r"dtype >f4 is not one of \["),
        ({"dtype": "<f4"}, "is not one of"),  # a str is not a dtype
        ({"shape": None}, "a raw field has a fixed shape of positive ints, not None"),
        ({"shape": (2, -1)}, r"not \(2, -1\)"),
        ({"shape": (2.0,)}, "positive ints"),
        ({"channels": 1}, "channels must be None for a raw value field"),
        ({"role": "image", "dtype": U1, "shape": (4, 4, 2), "channels": 2}, "a raw image is uint8"),
        ({"role": "image", "dtype": np.dtype("<f4"), "shape": (4, 4, 3)}, "not float32"),
        ({"role": "image", "dtype": U1, "shape": (4, 4, 3), "channels": 1}, "channels must be 3"),
        (
            {"role": "mask", "dtype": U1, "shape": (4, 4, 1), "channels": 1},
            "a raw mask is uint8 HxW",
        ),
        ({"role": "mask", "dtype": U1, "shape": (4, 4), "channels": None}, "channels must be 1"),
        ({"encoding": "image", "shape": None, "dtype": U1}, "role image or mask"),
        (
            {"encoding": "image", "role": "image", "shape": (4, 4, 3), "dtype": U1, "channels": 3},
            "shape None and dtype uint8",
        ),
        (
            {"encoding": "image", "role": "image", "shape": None, "channels": 3},
            "shape None and dtype uint8",
        ),
        (
            {"encoding": "image", "role": "image", "shape": None, "dtype": U1, "channels": 2},
            "3 channels",
        ),
        (
            {"encoding": "image", "role": "mask", "shape": None, "dtype": U1, "channels": 3},
            "masks to 1",
        ),
    ],
)
def test_field_spec_refusals_name_the_field_and_the_rule(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        field(**kw)
    assert str(info.value).startswith(f"field {kw.get('name', 'x')!r}: ")


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda o: o.pop("channels"), "a field entry has keys name, dtype"),
        (lambda o: o.update(extra=1), "a field entry has keys"),
        (lambda o: o.update(dtype="<c8"), "field 'label': unsupported dtype '<c8'"),
        (lambda o: o.update(shape="2"), "field 'label': shape must be a list of ints or null"),
        (lambda o: o.update(shape=[2.0]), "shape must be a list of ints"),
        (lambda o: o.update(shape=[True]), "shape must be a list of ints"),
        (lambda o: o.update(channels="1"), "channels must be an int or null"),
        (lambda o: o.update(channels=True), "channels must be an int or null"),
        (lambda o: o.update(role="target"), "field 'label': role must be"),
        (lambda o: o.update(encoding=None), "encoding must be raw or image, not None"),
    ],
)
def test_from_json_refuses_with_value_error_only(
    mutate: Callable[[dict[str, Any]], None], match: str
) -> None:
    obj = VALID[1].to_json()
    mutate(obj)
    with pytest.raises(ValueError, match=match):
        FieldSpec.from_json(obj)


@pytest.mark.parametrize("obj", [None, [], "label", {"name": "x"}])
def test_from_json_refuses_what_is_not_a_field_entry(obj: Any) -> None:
    with pytest.raises(ValueError, match="a field entry has keys"):
        FieldSpec.from_json(obj)


def test_le_dtype_makes_multibyte_dtypes_little_endian() -> None:
    assert le_dtype(">f4").str == "<f4"
    assert le_dtype(np.int64).str == "<i8"
    assert le_dtype("u1").str == "|u1" and le_dtype(bool).str == "|b1"


# ---------------------------------------------------------------- read_header


def test_read_header_round_trip(tmp_path: Path) -> None:
    assert read_header(seal(tmp_path / "ds")) == HEADER


def with_(**changes: Any) -> dict[str, Any]:
    h = copy.deepcopy(HEADER)
    h.update(changes)
    return h


def sealed_then(edit: Callable[[bytearray], None]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        seal(folder)
        raw = bytearray((folder / HEADER_NAME).read_bytes())
        edit(raw)
        (folder / HEADER_NAME).write_bytes(bytes(raw))
        return folder

    return make


def _flip_last(raw: bytearray) -> None:
    raw[-1] ^= 0xFF


REFUSALS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("short", sealed_then(lambda r: r.__delitem__(slice(20, None))), "20 bytes is too short"),
    ("magic", lambda p: seal(p, magic=b"\x89BATCHX\n"), "bad magic"),
    ("bom", lambda p: seal(p, bom=0x04030201), "byte-order mark 0x04030201 is not 0x01020304"),
    ("newer", lambda p: seal(p, version=2), r"newer batchd \(format v2\); upgrade batchd"),
    ("older", lambda p: seal(p, version=0), "format version 0 is not supported .*reads v1"),
    ("length", sealed_then(lambda r: r.extend(b"x")), "does not match its JSON length"),
    ("trailer", sealed_then(_flip_last), "header checksum mismatch: .*repack"),
    ("body", sealed_then(lambda r: r.__setitem__(30, r[30] ^ 1)), "header checksum mismatch"),
    ("json", lambda p: seal(p, body=b"{not json"), "header JSON does not parse"),
    ("utf8", lambda p: seal(p, body=b'{"\xff": 1}'), "header JSON does not parse"),
    ("array", lambda p: seal(p, []), "header JSON is not an object"),
    ("no count", lambda p: seal(p, with_(count=None)), "'count' is missing or not a int"),
    ("bool count", lambda p: seal(p, with_(count=True)), "'count' is missing"),
    ("no packing", lambda p: seal(p, with_(packing=[])), "'packing' is missing or not a dict"),
    ("json v", lambda p: seal(p, with_(version=2)), "JSON says version 2, the prefix 1"),
    ("count 0", lambda p: seal(p, with_(count=0)), "count 0 is out of range"),
    ("chunk 0", lambda p: seal(p, with_(chunk_size=0)), "chunk_size 0 is out of range"),
    ("huge chunk", lambda p: seal(p, with_(chunk_size=1 << 35)), "chunk_size .* out of range"),
    ("classes", lambda p: seal(p, with_(classes="ab")), "classes must be a list of strings"),
    ("no fields", lambda p: seal(p, with_(fields=[])), "the header declares no fields"),
    (
        "files entry",
        lambda p: seal(p, with_(files={"label.raw": {"size": 16}})),
        "files entry 'label.raw' needs size",
    ),
    (
        "chunk count",
        lambda p: seal(p, with_(files={"label.raw": {"size": 16, "xxh3_64": "", "chunks": []}})),
        "'label.raw': 0 chunk checksums for 16 bytes",
    ),
    ("missing", lambda p: p, "missing: not a batchd dataset"),
    ("a folder", lambda p: (p / HEADER_NAME).mkdir() or p, "cannot be read"),
]


@pytest.mark.parametrize(("what", "make", "match"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_read_header_refusals_name_the_file_and_the_problem(
    tmp_path: Path, what: str, make: Callable[[Path], Path], match: str
) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    with pytest.raises(FormatError, match=match) as info:
        read_header(make(folder))
    assert info.value.path == folder / HEADER_NAME, what
    assert str(info.value).startswith(f"{folder / HEADER_NAME}: ")


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_covers_the_content_only() -> None:
    base = fingerprint_of(HEADER)
    assert len(base) == 32 and int(base, 16) >= 0
    reordered = dict(reversed(list(copy.deepcopy(HEADER).items())))
    assert fingerprint_of(reordered) == base
    assert fingerprint_of(with_(packing={"batchd": "other"}, skipped=[{"x": 1}])) == base
    for key, value in [
        ("count", 3),
        ("classes", None),
        ("fields", [VALID[0].to_json()]),
        ("chunk_size", 16),
        ("files", {}),
    ]:
        assert fingerprint_of(with_(**{key: value})) != base, key
