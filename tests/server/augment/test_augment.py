"""Augmentation pipelines (batchd_server.augment, batchd_server.augment.ops)."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pytest
from numpy.typing import NDArray

from batchd_server.augment import Pipeline
from batchd_server.augment.ops import OPS
from batchd_server.errors import PipelineError
from batchd_server.shuffle import uniforms

Array = NDArray[Any]


@dataclass(frozen=True)
class Field:
    role: str
    dtype: Any
    shape: tuple[int | None, ...] | None
    channels: int | None = None


def run(
    spec: Any,
    sources: Mapping[str, Sequence[Any] | Array],
    fields: Mapping[str, Field],
    ids: Sequence[int],
    *,
    seed: int = 0,
    epoch: int = 0,
    splits: Sequence[range] | None = None,
) -> dict[str, Array]:
    """Run a pipeline over one batch the way the server does; returns the batch buffers."""
    p = spec if isinstance(spec, Pipeline) else Pipeline.parse(spec)
    ids_arr = np.asarray(ids, dtype=np.int64)
    out = {k: np.full((len(ids_arr), *s), 77, d) for k, (d, s) in p.output_fields(fields).items()}

    def load(r: int) -> dict[str, Array]:
        return {name: src[int(ids_arr[r])] for name, src in sources.items()}

    for rows in splits or [range(len(ids_arr))]:
        p.run(load, ids_arr, seed, epoch, out, rows, fields=fields)
    return out


def images(n: int = 8, h: int = 32, w: int = 40, seed: int = 0) -> Array:
    src = np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    src.flags.writeable = False  # like a read-only memmap: the pipeline must never write to it
    return src


IMG = {"image": Field("image", np.uint8, (32, 40, 3))}


# --- parsing and canonical form -------------------------------------------------------------


def test_canonical_fills_defaults_and_normalises_spelling() -> None:
    a = Pipeline.parse([{"op": "random_crop", "size": 24}, {"op": "hflip"}])
    b = Pipeline.parse(
        '[{"size": [24, 24], "op": "random_crop", "padding": 0}, {"p": 0.5, "op": "hflip"}]'
    )
    assert a == b and hash(a) == hash(b)
    assert a.canonical == b.canonical
    assert a.canonical == '[{"op":"random_crop","padding":0,"size":[24,24]},{"op":"hflip","p":0.5}]'
    assert a.digest == b.digest and len(a.digest) == 64
    assert json.loads(a.canonical)[1] == {"op": "hflip", "p": 0.5}
    assert (
        Pipeline.parse([{"op": "hflip", "p": 1}]).canonical
        == Pipeline.parse([{"op": "hflip", "p": 1.0}]).canonical
    )
    assert Pipeline.parse([{"op": "hflip", "p": 1}]) != a
    assert Pipeline.parse(a.canonical) == a


def test_defaults_are_filled() -> None:
    (rrc,) = json.loads(Pipeline.parse([{"op": "random_resized_crop", "size": [8, 16]}]).canonical)
    assert rrc == {
        "op": "random_resized_crop",
        "size": [8, 16],
        "scale": [0.08, 1.0],
        "ratio": [0.75, 4 / 3],
    }
    assert Pipeline.parse([]).ops == ()


def test_unknown_op_lists_the_known_ops() -> None:
    with pytest.raises(PipelineError) as info:
        Pipeline.parse([{"op": "hflip"}, {"op": "sharpen"}])
    assert info.value.op_index == 1 and info.value.param == "op"
    for name in OPS:
        assert name in str(info.value)


def test_unknown_parameter_lists_the_allowed_ones() -> None:
    with pytest.raises(
        PipelineError,
        match=r"op 0 \(random_crop\): unknown parameter 'pad'; allowed: padding, size",
    ) as info:
        Pipeline.parse([{"op": "random_crop", "size": 4, "pad": 2}])
    assert info.value.param == "pad"


BAD = [
    ({"op": "hflip", "p": 1.5}, "p", r"\[0, 1\]"),
    ({"op": "hflip", "p": float("nan")}, "p", "finite"),
    ({"op": "hflip", "p": "0.5"}, "p", "number"),
    ({"op": "hflip", "p": True}, "p", "number"),
    ({"op": "vflip", "p": -0.1}, "p", r"\[0, 1\]"),
    ({"op": "random_crop"}, "size", "missing required"),
    ({"op": "random_crop", "size": 0}, "size", "1, 65536"),
    ({"op": "random_crop", "size": [4]}, "size", "height, width"),
    ({"op": "random_crop", "size": [4, 2.5]}, "size", "integers"),
    ({"op": "random_crop", "size": 4, "padding": -1}, "padding", r"\[0, 4096\]"),
    ({"op": "center_crop", "size": 10**6}, "size", "65536"),
    ({"op": "resize", "size": "big"}, "size", "integer"),
    ({"op": "random_resized_crop", "size": 8, "scale": [0.5, 0.1]}, "scale", "low <= high"),
    ({"op": "random_resized_crop", "size": 8, "scale": [0, 1]}, "scale", "0 < low <= high <= 1"),
    ({"op": "random_resized_crop", "size": 8, "ratio": [1, float("inf")]}, "ratio", "low <= high"),
    ({"op": "rotate", "degrees": 200}, "degrees", r"\[0, 180\]"),
    ({"op": "rotate"}, "degrees", "missing required"),
    ({"op": "brightness", "delta": 2}, "delta", r"\[0, 1\]"),
    ({"op": "contrast", "range": [1.2, 0.8]}, "range", "low <= high"),
    ({"op": "contrast", "range": 1.0}, "range", r"\[low, high\]"),
    ({"op": "saturation", "range": [-1, 1]}, "range", r"\[low, high\]"),
    ({"op": "cutout", "size": 4, "p": 2}, "p", r"\[0, 1\]"),
    ({"op": "normalize", "mean": [0.5], "std": [0]}, "std", "positive"),
    ({"op": "normalize", "mean": [float("nan")], "std": [1]}, "mean", "finite"),
    ({"op": "normalize", "mean": [], "std": [1]}, "mean", "1..512"),
]


@pytest.mark.parametrize(
    ("raw", "param", "allowed"), BAD, ids=[f"{r['op']}-{p}-{i}" for i, (r, p, _) in enumerate(BAD)]
)
def test_bad_parameters_name_op_position_and_parameter(
    raw: dict[str, Any], param: str, allowed: str
) -> None:
    spec = [{"op": "hflip"}, raw]
    with pytest.raises(PipelineError) as info:
        Pipeline.parse(spec)
    assert info.value.op_index == 1
    assert info.value.param == param
    msg = str(info.value)
    assert msg.startswith(f"op 1 ({raw['op']}): ")
    assert param in msg
    assert re.search(allowed, msg), msg


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("not json", "not valid JSON"),
        ('{"op": "hflip"}', "JSON list of ops"),
        ([["hflip"]], "must be an object"),
        ([{"p": 0.5}], "unknown op None"),
        (
            [{"op": "normalize", "mean": 0.5, "std": 0.2}, {"op": "hflip"}],
            "normalize must be the last op",
        ),
        ([{"op": "hflip"}] * 65, "at most 64 ops"),
    ],
)
def test_malformed_pipelines(spec: Any, match: str) -> None:
    with pytest.raises(PipelineError, match=match):
        Pipeline.parse(spec)


# --- output_fields ----------------------------------------------------------------------------


def test_output_fields() -> None:
    fields = {
        "image": Field("image", np.uint8, (64, 48, 3)),
        "mask": Field("mask", np.uint8, (64, 48)),
        "label": Field("value", np.int64, ()),
    }
    p = Pipeline.parse([{"op": "random_crop", "size": [32, 16]}, {"op": "hflip"}])
    assert p.output_fields(fields) == {
        "image": (np.dtype(np.uint8), (32, 16, 3)),
        "mask": (np.dtype(np.uint8), (32, 16)),
        "label": (np.dtype(np.int64), ()),
    }
    norm = Pipeline.parse([{"op": "normalize", "mean": [0.5, 0.5, 0.5], "std": 0.25}])
    assert norm.output_fields(fields)["image"] == (np.dtype(np.float32), (64, 48, 3))
    assert norm.output_fields(fields)["mask"] == (np.dtype(np.uint8), (64, 48))


def test_variable_size_needs_a_size_op() -> None:
    fields = {"image": Field("image", np.uint8, None, channels=3)}
    for spec in ([], [{"op": "hflip"}, {"op": "brightness", "delta": 0.1}]):
        with pytest.raises(
            PipelineError, match="add resize, center_crop or random_resized_crop with a size"
        ):
            Pipeline.parse(spec).output_fields(fields)
    p = Pipeline.parse([{"op": "resize", "size": [20, 30]}, {"op": "hflip"}])
    assert p.output_fields(fields) == {"image": (np.dtype(np.uint8), (20, 30, 3))}
    partial = {"image": Field("image", np.uint8, (None, None, 1))}
    assert p.output_fields(partial) == {"image": (np.dtype(np.uint8), (20, 30, 1))}


@pytest.mark.parametrize(
    ("spec", "fields", "match"),
    [
        (
            [{"op": "center_crop", "size": 40}],
            IMG,
            r"op 0 \(center_crop\): size 40x40 is larger than the 32x40 input",
        ),
        (
            [{"op": "random_crop", "size": 36}],
            IMG,
            "larger than the 32x40 input; use a smaller size, add padding",
        ),
        (
            [{"op": "resize", "size": 8}, {"op": "random_crop", "size": 9}],
            IMG,
            r"op 1 \(random_crop\)",
        ),
        (
            [{"op": "saturation", "range": [0, 1]}],
            {"image": Field("image", np.uint8, (8, 8))},
            "3-channel RGB",
        ),
        (
            [{"op": "brightness", "delta": 0.1}],
            {"image": Field("image", np.float32, (8, 8, 3))},
            "needs uint8",
        ),
        (
            [{"op": "resize", "size": 4}],
            {"image": Field("image", np.int32, (8, 8))},
            "resampling needs one of",
        ),
        (
            [{"op": "normalize", "mean": [0, 0], "std": 1}],
            IMG,
            "mean has 2 values; field 'image' has 3",
        ),
        (
            [{"op": "hflip"}],
            {"image": Field("image", np.uint8, (8, 8, 3)), "mask": Field("mask", np.uint8, (4, 4))},
            "same height and width",
        ),
        (
            [{"op": "rotate", "degrees": 5}],
            {"image": Field("image", np.uint8, (8, 8)), "mask": Field("mask", np.bool_, (8, 8))},
            "cannot rotate",
        ),
        ([], {"image": Field("image", np.uint8, (8,))}, r"HxW or HxWxC"),
        ([], {"x": Field("label", np.uint8, ())}, "roles are image, mask, value"),
        ([], {"x": Field("value", np.uint8, None)}, "variable shape"),
    ],
)
def test_output_fields_refuses_what_cannot_work(
    spec: Any, fields: Mapping[str, Field], match: str
) -> None:
    with pytest.raises(PipelineError, match=match):
        Pipeline.parse(spec).output_fields(fields)


def test_padding_allows_a_larger_crop() -> None:
    p = Pipeline.parse([{"op": "random_crop", "size": 36, "padding": 2}])
    assert p.output_fields(IMG)["image"] == (np.dtype(np.uint8), (36, 36, 3))


# --- each op's effect ----------------------------------------------------------------------------


def test_empty_pipeline_is_a_gather() -> None:
    src = images()
    labels = np.arange(8, dtype=np.int64) * 10
    fields = IMG | {"label": Field("value", np.int64, ())}
    out = run([], {"image": src, "label": labels}, fields, [3, 1, 3])
    assert np.array_equal(out["image"], src[[3, 1, 3]])
    assert out["label"].tolist() == [30, 10, 30]


def test_hflip_and_vflip_with_p1_equal_cv2_flip() -> None:
    src = images()
    out = run([{"op": "hflip", "p": 1}], {"image": src}, IMG, [0, 5])
    assert np.array_equal(out["image"][1], cv2.flip(src[5], 1))
    out = run([{"op": "vflip", "p": 1}], {"image": src}, IMG, [0, 5])
    assert np.array_equal(out["image"][1], cv2.flip(src[5], 0))
    out = run([{"op": "hflip", "p": 1}, {"op": "vflip", "p": 1.0}], {"image": src}, IMG, [2])
    assert np.array_equal(out["image"][0], src[2][::-1, ::-1])
    out = run([{"op": "hflip", "p": 1}, {"op": "hflip", "p": 1}], {"image": src}, IMG, [2])
    assert np.array_equal(out["image"][0], src[2])
    out = run([{"op": "hflip", "p": 0}], {"image": src}, IMG, [2])
    assert np.array_equal(out["image"][0], src[2])


def test_hflip_probability() -> None:
    src = np.zeros((400, 1, 2, 1), np.uint8)
    src[:, 0, 0] = 1
    out = run(
        [{"op": "hflip", "p": 0.25}],
        {"image": src},
        {"image": Field("image", np.uint8, (1, 2, 1))},
        range(400),
    )
    flipped = int((out["image"][:, 0, 1, 0] == 1).sum())
    assert 70 <= flipped <= 130  # binomial(400, 0.25): mean 100, sd 8.7; fixed seed


def test_center_crop_picks_the_centre() -> None:
    src = images()
    out = run([{"op": "center_crop", "size": [10, 21]}], {"image": src}, IMG, [4])
    assert np.array_equal(out["image"][0], src[4][11:21, 9:30])


def coordinate_images(n: int, h: int, w: int) -> Array:
    """Pixel (y, x) holds (y, x, sample): a crop tells where it came from."""
    y, x = np.mgrid[0:h, 0:w]
    src = np.stack(
        [np.broadcast_to(np.stack([y, x, np.full_like(y, i)], -1), (h, w, 3)) for i in range(n)]
    )
    return src.astype(np.uint8)


def test_random_crop_is_a_window_at_the_drawn_offset() -> None:
    src = coordinate_images(6, 30, 50)
    fields = {"image": Field("image", np.uint8, (30, 50, 3))}
    out = run(
        [{"op": "random_crop", "size": [12, 20]}], {"image": src}, fields, range(6), seed=9, epoch=4
    )
    u = uniforms(9, 4, np.arange(6), stream=0, n=2)
    tops = set()
    for i in range(6):
        top, left = int(u[i, 0] * 19), int(u[i, 1] * 31)
        assert np.array_equal(out["image"][i], src[i, top : top + 12, left : left + 20])
        tops.add(top)
    assert len(tops) > 1


def test_random_crop_padding_fills_zeros() -> None:
    src = np.full((50, 4, 4, 1), 9, np.uint8)
    fields = {"image": Field("image", np.uint8, (4, 4, 1))}
    out = run([{"op": "random_crop", "size": 6, "padding": 3}], {"image": src}, fields, range(50))
    img = out["image"]
    assert img.shape == (50, 6, 6, 1)
    assert set(np.unique(img)) == {0, 9}
    assert ((img == 9).sum(axis=(1, 2, 3)) <= 16).all()
    assert (
        (img == 9).any(axis=(1, 2, 3)).all()
    )  # a 6x6 window of the 10x10 padded image always overlaps


def test_resize_matches_cv2() -> None:
    src = images()
    out = run([{"op": "resize", "size": [16, 60]}], {"image": src}, IMG, [1])
    assert np.array_equal(
        out["image"][0], cv2.resize(src[1], (60, 16), interpolation=cv2.INTER_LINEAR)
    )


def test_rotate_zero_degrees_is_identity_and_rotation_keeps_the_centre() -> None:
    src = images()
    out = run([{"op": "rotate", "degrees": 0}], {"image": src}, IMG, [1])
    assert np.array_equal(out["image"][0], src[1])
    disc = np.zeros((1, 33, 33, 3), np.uint8)
    cv2.circle(disc[0], (16, 16), 6, (200, 100, 50), -1)
    fields = {"image": Field("image", np.uint8, (33, 33, 3))}
    out = run([{"op": "rotate", "degrees": 180}], {"image": disc}, fields, [0], seed=3)
    assert np.array_equal(out["image"][0, 13:20, 13:20], disc[0, 13:20, 13:20])


def test_rotate_fills_corners_with_zero() -> None:
    src = np.full((1, 32, 32, 3), 200, np.uint8)
    fields = {"image": Field("image", np.uint8, (32, 32, 3))}
    angles = [(2 * u - 1) * 90 for u in uniforms(0, 0, np.array([0]), stream=0, n=2)[0, 1:]]
    assert abs(angles[0]) > 10  # the draw for this seed really rotates
    out = run([{"op": "rotate", "degrees": 90}], {"image": src}, fields, [0])
    assert out["image"][0, 0, 0].tolist() == [0, 0, 0]
    assert out["image"][0, 16, 16].tolist() == [200, 200, 200]


def test_brightness_adds_one_offset_within_delta() -> None:
    src = np.full((20, 4, 4, 3), 128, np.uint8)
    fields = {"image": Field("image", np.uint8, (4, 4, 3))}
    out = run([{"op": "brightness", "delta": 0.2}], {"image": src}, fields, range(20))
    offsets = out["image"].astype(int) - 128
    per_image = offsets.reshape(20, -1)
    assert (per_image == per_image[:, :1]).all()
    assert np.abs(offsets).max() <= 51
    assert len(set(per_image[:, 0].tolist())) > 10


def test_contrast_and_saturation_extremes() -> None:
    src = images()
    same = run(
        [{"op": "contrast", "range": [1, 1]}, {"op": "saturation", "range": [1, 1]}],
        {"image": src},
        IMG,
        [0],
    )
    assert np.array_equal(same["image"][0], src[0])
    flat = run([{"op": "contrast", "range": [0, 0]}], {"image": src}, IMG, [0])["image"][0]
    assert len(np.unique(flat)) == 1
    grey_level = cv2.cvtColor(src[0], cv2.COLOR_RGB2GRAY).mean()
    assert abs(int(flat[0, 0, 0]) - grey_level) <= 1
    grey = run([{"op": "saturation", "range": [0, 0]}], {"image": src}, IMG, [0])["image"][0]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    assert np.abs(grey[..., 0].astype(int) - cv2.cvtColor(src[0], cv2.COLOR_RGB2GRAY)).max() <= 1


def test_cutout_zeroes_a_rectangle_in_images_only() -> None:
    src = np.full((10, 20, 20, 3), 5, np.uint8)
    mask = np.full((10, 20, 20), 3, np.uint8)
    fields = {
        "image": Field("image", np.uint8, (20, 20, 3)),
        "mask": Field("mask", np.uint8, (20, 20)),
    }
    out = run(
        [{"op": "cutout", "size": [6, 4], "p": 1}], {"image": src, "mask": mask}, fields, range(10)
    )
    assert (out["mask"] == 3).all()
    for img in out["image"]:
        ys, xs = np.nonzero(img[..., 0] == 0)
        assert 0 < len(ys) <= 24
        assert len(ys) == (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)  # one rectangle
        assert (img[ys, xs] == 0).all()
    assert (src == 5).all()  # the source was copied, not written


def test_normalize_maths() -> None:
    src = images()
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    out = run([{"op": "normalize", "mean": mean, "std": std}], {"image": src}, IMG, [3])
    img = out["image"][0]
    assert img.dtype == np.float32
    expected = (src[3] / 255.0 - np.array(mean)) / np.array(std)
    assert np.allclose(img, expected, atol=1e-5)
    flipped = run(
        [{"op": "hflip", "p": 1}, {"op": "normalize", "mean": mean, "std": std}],
        {"image": src},
        IMG,
        [3],
    )
    assert np.array_equal(flipped["image"][0], img[:, ::-1])
    wide = np.random.default_rng(1).integers(0, 4000, (2, 5, 6, 2), dtype=np.uint16)
    fields = {"image": Field("image", np.uint16, (5, 6, 2))}
    out = run(
        [{"op": "vflip", "p": 1}, {"op": "normalize", "mean": [100, 200], "std": 50}],
        {"image": wide},
        fields,
        [1],
    )
    assert np.allclose(
        out["image"][0], (wide[1][::-1] - np.array([100, 200])) / 50, rtol=1e-5, atol=1e-4
    )


# --- invariants ----------------------------------------------------------------------------

FULL = [
    {"op": "random_resized_crop", "size": [20, 24], "scale": [0.3, 1]},
    {"op": "hflip"},
    {"op": "rotate", "degrees": 20, "p": 0.7},
    {"op": "random_crop", "size": [18, 22], "padding": 2},
    {"op": "vflip", "p": 0.3},
    {"op": "brightness", "delta": 0.1},
    {"op": "contrast", "range": [0.7, 1.3]},
    {"op": "saturation", "range": [0.5, 1.5]},
    {"op": "cutout", "size": 5},
]
FIELDS = {
    "image": Field("image", np.uint8, (32, 40, 3)),
    "mask": Field("mask", np.uint8, (32, 40, 1)),
    "label": Field("value", np.int64, (2,)),
}


def full_sources(n: int = 12) -> dict[str, Array]:
    img = images(n)
    return {
        "image": img,
        "mask": (img[..., :1] // 64).copy(),
        "label": np.arange(2 * n, dtype=np.int64).reshape(n, 2),
    }


def test_same_inputs_same_bytes_and_epochs_differ() -> None:
    src = full_sources()
    a = run(FULL, src, FIELDS, range(12), seed=4, epoch=1)
    b = run(Pipeline.parse(json.dumps(FULL)), src, FIELDS, range(12), seed=4, epoch=1)
    for name in FIELDS:
        assert a[name].tobytes() == b[name].tobytes()
    c = run(FULL, src, FIELDS, range(12), seed=4, epoch=2)
    d = run(FULL, src, FIELDS, range(12), seed=5, epoch=1)
    for other in (c, d):
        assert not np.array_equal(a["image"], other["image"])
        assert all(not np.array_equal(a["image"][i], other["image"][i]) for i in range(12))
        assert np.array_equal(a["label"], other["label"])


def test_result_does_not_depend_on_row_split_or_batch_composition() -> None:
    src = full_sources()
    ids = [5, 0, 11, 3, 7, 2, 9]
    whole = run(FULL, src, FIELDS, ids, seed=1)
    split = run(FULL, src, FIELDS, ids, seed=1, splits=[range(0, 2), range(5, 7), range(2, 5)])
    strided = run(FULL, src, FIELDS, ids, seed=1, splits=[range(0, 7, 2), range(1, 7, 2)])
    other_batch = run(FULL, src, FIELDS, [7, 5], seed=1)
    for name in FIELDS:
        assert np.array_equal(whole[name], split[name])
        assert np.array_equal(whole[name], strided[name])
        assert np.array_equal(other_batch[name][0], whole[name][4])
        assert np.array_equal(other_batch[name][1], whole[name][0])


def block_image(rng: np.random.Generator) -> tuple[Array, Array]:
    """A 64x64 image of 4x4 blocks of 16 px, each a distinct colour, and its label mask."""
    labels = rng.permutation(16).reshape(4, 4) + 1
    mask = np.kron(labels, np.ones((16, 16), np.int64)).astype(np.uint8)
    palette = np.zeros((17, 3), np.uint8)
    palette[1:] = np.stack(
        [np.arange(1, 17) * 15, 255 - np.arange(1, 17) * 12, np.arange(1, 17) * 7 + 30], -1
    )
    return palette[mask], mask


def test_mask_follows_image_through_geometric_ops() -> None:
    rng = np.random.default_rng(0)
    pairs = [block_image(rng) for _ in range(16)]
    imgs = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    palette = {
        int(m): tuple(int(c) for c in img[y, x])
        for img, mask in pairs
        for (y, x), m in np.ndenumerate(mask)
    }
    palette[0] = (0, 0, 0)
    fields = {
        "image": Field("image", np.uint8, (64, 64, 3)),
        "mask": Field("mask", np.uint8, (64, 64)),
    }
    spec = [
        {"op": "random_resized_crop", "size": [48, 48], "scale": [0.4, 1]},
        {"op": "hflip"},
        {"op": "rotate", "degrees": 30},
        {"op": "vflip"},
    ]
    out = run(spec, {"image": imgs, "mask": masks}, fields, range(16), seed=2)
    checked = 0
    flipped = 0
    for img, mask, src_mask in zip(out["image"], out["mask"], masks, strict=True):
        assert set(np.unique(mask)) <= set(range(17))  # nearest-neighbour: no blended labels
        # Away from block edges the image colour is the colour of the mask's label.
        # (and off the frame's edge, where bilinear blends in the zero border but nearest does not).
        interior = cv2.erode(mask, np.ones((5, 5), np.uint8)) == cv2.dilate(
            mask, np.ones((5, 5), np.uint8)
        )
        interior[[0, 1, -2, -1], :] = False
        interior[:, [0, 1, -2, -1]] = False
        for y, x in zip(*np.nonzero(interior), strict=True):
            assert tuple(int(c) for c in img[y, x]) == palette[int(mask[y, x])]
            checked += 1
        flipped += int(
            not np.array_equal(
                cv2.resize(src_mask, (48, 48), interpolation=cv2.INTER_NEAREST), mask
            )
        )
    assert checked > 16 * 500
    assert flipped > 8


def test_flips_commute_with_crops_rotations_and_cutout() -> None:
    """A pending flip is mapped into the crop/rotation/cutout: same as doing it in order."""
    src = images(4, 30, 44)
    fields = {"image": Field("image", np.uint8, (30, 44, 3))}
    flip_then = run(
        [{"op": "hflip", "p": 1}, {"op": "vflip", "p": 1}, {"op": "center_crop", "size": [13, 17]}],
        {"image": src},
        fields,
        [2],
    )
    assert np.array_equal(flip_then["image"][0], src[2][::-1, ::-1][8:21, 13:30])
    u = uniforms(0, 0, np.array([1]), stream=1, n=2)[0]
    got = run(
        [{"op": "hflip", "p": 1}, {"op": "random_crop", "size": [10, 20]}],
        {"image": src},
        fields,
        [1],
    )
    top, left = int(u[0] * 21), int(u[1] * 25)
    assert np.array_equal(got["image"][0], src[1][:, ::-1][top : top + 10, left : left + 20])
    u = uniforms(0, 0, np.array([1]), stream=1, n=2)[0]
    got = run(
        [{"op": "hflip", "p": 1}, {"op": "rotate", "degrees": 40}], {"image": src}, fields, [1]
    )
    m = cv2.getRotationMatrix2D((43 / 2, 29 / 2), (2 * u[1] - 1) * 40, 1.0)
    ref = cv2.warpAffine(np.ascontiguousarray(src[1][:, ::-1]), m, (44, 30), flags=cv2.INTER_LINEAR)
    diff = np.abs(got["image"][0].astype(int) - ref)
    assert diff.max() <= 2 and (diff == 0).mean() > 0.95  # mirrored bilinear rounding only
    u = uniforms(0, 0, np.array([0]), stream=1, n=3)[0]
    white = np.full((1, 30, 44, 3), 255, np.uint8)
    white[0, :, :22] = 100  # left half darker: tells whether the rectangle was mirrored
    got = run(
        [{"op": "hflip", "p": 1}, {"op": "cutout", "size": [6, 8], "p": 1}],
        {"image": white},
        fields,
        [0],
    )
    ref_img = np.ascontiguousarray(white[0][:, ::-1])
    cy, cx = int(u[1] * 30) - 3, int(u[2] * 44) - 4
    ref_img[max(cy, 0) : cy + 6, max(cx, 0) : cx + 8] = 0
    assert np.array_equal(got["image"][0], ref_img)


def test_mask_with_channel_axis_and_value_fields() -> None:
    src = full_sources(3)
    out = run([{"op": "hflip", "p": 1}, {"op": "center_crop", "size": 16}], src, FIELDS, [2, 0])
    assert out["mask"].shape == (2, 16, 16, 1)
    assert np.array_equal(out["mask"][0], src["mask"][2][8:24, 12:28][:, ::-1])
    assert out["label"].tolist() == [[4, 5], [0, 1]]


def test_variable_size_images_are_resized_or_refused() -> None:
    rng = np.random.default_rng(3)
    decoded = [
        rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(40, 60), (25, 30), (64, 33)]
    ]
    fields = {"image": Field("image", np.uint8, None, channels=3)}
    out = run(
        [{"op": "random_resized_crop", "size": [16, 16]}, {"op": "hflip"}],
        {"image": decoded},
        fields,
        [0, 1, 2],
    )
    assert out["image"].shape == (3, 16, 16, 3)
    with pytest.raises(
        PipelineError, match=r"op 0 \(random_crop\): sample 1 is 25x30, smaller than the crop 28x28"
    ):
        run([{"op": "random_crop", "size": 28}], {"image": decoded}, fields, [0, 1])


def test_wrong_source_shape_is_reported() -> None:
    src = images()
    labels = np.zeros((8, 3), np.int64)
    fields = IMG | {"label": Field("value", np.int64, (2,))}
    with pytest.raises(
        PipelineError, match=r"sample 1: field 'label' has shape \(3,\), expected \(2,\)"
    ):
        run([], {"image": src, "label": labels}, fields, [1])
    wrong = {"image": images(8, 30, 40)}
    with pytest.raises(
        PipelineError, match=r"sample 1: field 'image' is \(30, 40, 3\), expected 32x40"
    ):
        run([{"op": "hflip"}], wrong, IMG, [1])  # crop/flip fast path
    with pytest.raises(PipelineError, match="after the pipeline but the batch holds"):
        run([{"op": "brightness", "delta": 0.1}], wrong, IMG, [1])  # op-by-op path


@pytest.mark.parametrize("axis", [0, 1])
def test_resized_mask_stays_on_the_image_to_the_pixel(axis: int) -> None:
    # Stripes along one axis: a bilinear image thresholded at half-grey must equal the
    # nearest-neighbour mask everywhere. cv2's plain INTER_NEAREST is half a pixel off.
    rng = np.random.default_rng(axis)
    stripes = (rng.random((8, 20)) < 0.5).astype(np.uint8)
    masks = np.stack(
        [np.broadcast_to(s[:, None] if axis == 0 else s[None, :], (20, 20)) for s in stripes]
    )
    imgs = np.repeat((masks * 255)[..., None], 3, axis=-1)
    fields = {
        "image": Field("image", np.uint8, (20, 20, 3)),
        "mask": Field("mask", np.uint8, (20, 20)),
    }
    for spec in (
        [{"op": "resize", "size": [50, 37]}],
        [{"op": "random_resized_crop", "size": [64, 64], "scale": [0.3, 0.9]}, {"op": "hflip"}],
    ):
        out = run(spec, {"image": imgs, "mask": masks}, fields, range(8))
        grey = out["image"][..., 0]
        decided = (grey != 127) & (grey != 128)
        assert ((grey > 127) == (out["mask"] > 0))[decided].all()


@pytest.mark.parametrize(
    "spec",
    [
        [{"op": "random_crop", "size": [20, 24]}, {"op": "hflip"}],
        [
            {"op": "hflip"},
            {"op": "random_crop", "size": [25, 31]},
            {"op": "vflip"},
            {"op": "center_crop", "size": [10, 13]},
            {"op": "hflip", "p": 0.7},
        ],
        [
            {"op": "vflip", "p": 0.6},
            {"op": "center_crop", "size": [29, 37]},
            {"op": "random_crop", "size": 9},
            {"op": "normalize", "mean": [0.1, 0.2, 0.3], "std": 0.5},
        ],
        [{"op": "center_crop", "size": 30}],
    ],
)
def test_crop_and_flip_fast_path_equals_the_general_path(spec: list[dict[str, Any]]) -> None:
    src = full_sources()
    fast = Pipeline.parse(spec)
    slow = Pipeline.parse(spec)
    slow._windows_only = False  # force the op-by-op interpreter
    ids = [3, 11, 0, 7, 7, 5, 1, 9, 2]
    a = run(fast, src, FIELDS, ids, seed=8, epoch=3)
    b = run(slow, src, FIELDS, ids, seed=8, epoch=3)
    assert fast._windows_only
    for name in FIELDS:
        assert a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize(
    "spec",
    [
        [{"op": "random_crop", "size": [20, 24]}, {"op": "hflip"}],
        [{"op": "vflip", "p": 0.6}, {"op": "random_crop", "size": 9}, {"op": "hflip", "p": 0.7}],
        [
            {"op": "center_crop", "size": [29, 37]},
            {"op": "hflip"},
            {"op": "normalize", "mean": [0.1, 0.2, 0.3], "std": 0.5},
        ],
        [{"op": "center_crop", "size": 30}],
        FULL,  # not copies_only: run_arrays hands it to run
    ],
)
def test_run_over_whole_arrays_equals_run_over_loaded_samples(spec: list[dict[str, Any]]) -> None:
    """The server's path over a mapped raw pack (run_arrays) gives run's bytes."""
    src = full_sources()
    p = Pipeline.parse(spec)
    ids = np.array([3, 11, 0, 7, 7, 5, 1, 9, 2], dtype=np.int64)
    expected = run(p, src, FIELDS, ids, seed=8, epoch=3)
    out = {k: np.zeros((len(ids), *s), d) for k, (d, s) in p.output_fields(FIELDS).items()}
    for rows in (range(0, 4), range(4, 9)):  # split rows as the server's threads do
        p.run_arrays(src, ids, 8, 3, out, rows, fields=FIELDS)
    for name in FIELDS:
        assert out[name].tobytes() == expected[name].tobytes(), name


def test_run_arrays_refuses_a_field_of_another_size() -> None:
    p = Pipeline.parse([{"op": "random_crop", "size": 8}])
    src = full_sources()
    src["mask"] = src["mask"][:, :30]  # 30x40, the dataset says 32x40
    out = {k: np.zeros((2, *s), d) for k, (d, s) in p.output_fields(FIELDS).items()}
    with pytest.raises(PipelineError, match="expected 32x40"):
        p.run_arrays(src, np.array([0, 1]), 0, 0, out, range(2), fields=FIELDS)


def test_threads_writing_disjoint_rows_give_the_same_batch() -> None:
    from concurrent.futures import ThreadPoolExecutor

    src = full_sources()
    p = Pipeline.parse(FULL)
    ids = np.array([4, 8, 1, 1, 10, 6, 0, 2, 3], dtype=np.int64)
    whole = run(p, src, FIELDS, ids, seed=6)
    out = {k: np.zeros((len(ids), *s), d) for k, (d, s) in p.output_fields(FIELDS).items()}

    def load(r: int) -> dict[str, Array]:
        return {name: a[int(ids[r])] for name, a in src.items()}

    with ThreadPoolExecutor(3) as pool:
        chunks = [range(i, len(ids), 3) for i in range(3)]
        list(pool.map(lambda rows: p.run(load, ids, 6, 0, out, rows, fields=FIELDS), chunks))
    for name in FIELDS:
        assert np.array_equal(out[name], whole[name])


@pytest.mark.parametrize(
    "spec",
    [
        [{"op": "hflip", "p": 0.5}],
        [{"op": "vflip", "p": 0.6}, {"op": "hflip", "p": 0.7}],
        [{"op": "hflip", "p": 1.0}, {"op": "hflip", "p": 0.5}],
    ],
)
def test_flip_in_place_equals_the_general_path(spec: list[dict[str, Any]]) -> None:
    """The server gathers flips-only batches as stored, then flips them where they lie."""
    src = full_sources()
    p = Pipeline.parse(spec)
    assert p.flips_only(FIELDS)
    ids = np.array([3, 11, 0, 7, 7, 5, 1, 9, 2], dtype=np.int64)
    expected = run(spec, src, FIELDS, ids, seed=8, epoch=3)
    gathered = {name: np.ascontiguousarray(src[name][ids]) for name in FIELDS}
    for rows in (range(0, 4), range(4, 9)):  # split rows as the server's threads do
        p.flip_in_place(ids, 8, 3, gathered, rows, fields=FIELDS)
    for name in FIELDS:
        assert gathered[name].tobytes() == expected[name].tobytes(), name


def test_flips_only_is_only_flips_of_fixed_size_fields() -> None:
    assert not Pipeline.parse([]).flips_only(FIELDS)
    assert not Pipeline.parse([{"op": "hflip"}, {"op": "center_crop", "size": 8}]).flips_only(
        FIELDS
    )
