"""The last step of every pipeline path: value fields and image rows into the batch."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from batchd_server.augment.rows import put_values, write_row
from batchd_server.errors import PipelineError


def test_values_are_copied_and_a_wrong_shape_names_the_sample_and_field() -> None:
    labels = np.zeros(4, np.int64)
    boxes = np.zeros((4, 2), np.float32)
    values = [("label", (), labels), ("box", (2,), boxes)]
    put_values(values, {"label": np.int64(7), "box": np.array([1.5, 2.5])}, 2, sid=42)
    assert labels.tolist() == [0, 0, 7, 0] and boxes[2].tolist() == [1.5, 2.5]
    with pytest.raises(PipelineError, match=r"sample 42: field 'box' has shape \(3,\)"):
        put_values(values, {"label": 1, "box": np.zeros(3)}, 0, sid=42)


@pytest.mark.parametrize(("code", "flip"), [(None, lambda a: a), (1, np.fliplr), (0, np.flipud)])
def test_write_row_folds_the_flip_into_the_copy(
    code: int | None, flip: Callable[[np.ndarray], np.ndarray]
) -> None:
    src = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    batch = np.zeros((2, 4, 5, 3), np.uint8)
    write_row(src, batch[1], (4, 5, 3), None, code)
    assert np.array_equal(batch[1], flip(src)) and not batch[0].any()


def test_write_row_into_a_grey_row_with_a_channel_axis() -> None:
    src = np.arange(12, dtype=np.uint8).reshape(3, 4)  # OpenCV's view: no channel axis
    batch = np.zeros((1, 3, 4, 1), np.uint8)
    write_row(src, batch[0], (3, 4), None, 1)
    assert np.array_equal(batch[0, :, :, 0], np.fliplr(src))


def test_write_row_normalises_with_the_flip() -> None:
    src = np.full((2, 3, 3), 255, np.uint8)
    src[:, 0] = 0
    scale = np.full(3, 1 / 255, np.float32)
    offset = np.zeros(3, np.float32)
    dst = np.zeros((2, 3, 3), np.float32)
    write_row(src, dst, (2, 3, 3), (None, scale, offset), 1)
    assert np.allclose(dst[:, 2], 0) and np.allclose(dst[:, :2], 1)
