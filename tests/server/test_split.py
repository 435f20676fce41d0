"""Splits of one pack (batchd_server.split): the rules of docs/protocol.md, pinned."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from batchd import kfold
from batchd.wire import parse_split
from batchd_server.split import resolve_split


def ids(expr: str, count: int, seed: int = 0, labels: np.ndarray | None = None) -> np.ndarray:
    return resolve_split(parse_split(expr), count, seed, labels)


def sorted_labels(count: int, classes: int) -> np.ndarray:
    """A pack packed class by class, as folder trees are."""
    return np.sort(np.arange(count) % classes)


def _nonempty(expr: str, count: int) -> np.ndarray:
    try:
        return ids(expr, count)
    except ValueError as exc:
        assert "selects none" in str(exc)
        return np.array([], np.int64)


@pytest.mark.parametrize("count", [1, 2, 3, 7, 10, 99, 101, 1000])
def test_adjacent_slices_meet_exactly(count: int) -> None:
    rng = np.random.default_rng(count)
    for _ in range(20):
        cuts = sorted({0, 100, *rng.integers(1, 100, 4).tolist()})
        parts = [_nonempty(f"[{a}%:{b}%]", count) for a, b in itertools.pairwise(cuts)]
        # No gap, no overlap, whatever the cuts: every bound rounds the same way.
        np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(count))


def test_train_and_validation_are_disjoint_cover_and_class_mixed() -> None:
    labels = sorted_labels(1000, 4)
    train, val = ids("[:80%]", 1000), ids("[80%:]", 1000)
    assert (len(train), len(val)) == (800, 200)
    np.testing.assert_array_equal(np.sort(np.r_[train, val]), np.arange(1000))
    # The split order is a permutation, not the packed order: every class in both.
    for part in (train, val):
        counts = np.bincount(labels[part], minlength=4) / len(part)
        assert np.all(np.abs(counts - 0.25) < 0.08), counts


def test_the_split_order_depends_on_split_seed_only() -> None:
    a, b = ids("[:50%]", 500, seed=0), ids("[:50%]", 500, seed=1)
    assert not np.array_equal(a, b)
    np.testing.assert_array_equal(a, ids("[:50%]", 500, seed=0))
    np.testing.assert_array_equal(a, ids("[0%:50%]", 500, seed=0))


@pytest.mark.parametrize(("count", "classes"), [(1000, 3), (103, 7), (40, 8), (57, 2)])
@pytest.mark.parametrize("frac", [80, 50, 33, 10])
def test_stratify_cuts_every_class_in_proportion(count: int, classes: int, frac: int) -> None:
    labels = sorted_labels(count, classes)
    train = ids(f"[:{frac}%]", count, labels=labels)
    rest = ids(f"[{frac}%:]", count, labels=labels)
    np.testing.assert_array_equal(np.sort(np.r_[train, rest]), np.arange(count))
    for c in range(classes):
        n_c = int(np.sum(labels == c))
        n_train = int(np.sum(labels[train] == c))
        assert abs(n_train - frac / 100 * n_c) < 1, (c, n_train, n_c)


def test_stratified_counts_are_a_fraction_of_each_class() -> None:
    labels = sorted_labels(1000, 3)  # 334, 333, 333
    got = ids("[:100]", 1000, labels=labels)
    assert abs(len(got) - 100) <= 3 / 2  # half a sample a class
    assert [int(np.sum(labels[got] == c)) for c in range(3)] == [33, 33, 33]


def test_unions_and_counts() -> None:
    order = ids("[:]", 40)
    np.testing.assert_array_equal(order, np.arange(40))
    union = ids("[:20%]+[40%:]", 40)
    gap = ids("[20%:40%]", 40)
    assert len(union) == 32 and len(gap) == 8
    np.testing.assert_array_equal(np.sort(np.r_[union, gap]), np.arange(40))
    assert len(ids("[:10]", 40)) == 10 and len(ids("[10:25]+[30:]", 40)) == 25


@pytest.mark.parametrize("n_folds", [2, 3, 5, 7, 10])
@pytest.mark.parametrize("stratify", [False, True])
def test_kfold_validation_parts_are_disjoint_and_cover(n_folds: int, stratify: bool) -> None:
    count = 503
    labels = sorted_labels(count, 5) if stratify else None
    vals = []
    for fold in range(n_folds):
        train_expr, val_expr = kfold(n_folds, fold)
        train = ids(train_expr, count, seed=7, labels=labels)
        val = ids(val_expr, count, seed=7, labels=labels)
        np.testing.assert_array_equal(np.sort(np.r_[train, val]), np.arange(count))
        # Whole-percent boundaries: a fold is within 1% of the pack of count / n_folds
        # (and half a sample a class and boundary with stratify).
        assert abs(len(val) - count / n_folds) <= count / 100 + 5
        vals.append(val)
    np.testing.assert_array_equal(np.sort(np.concatenate(vals)), np.arange(count))


@pytest.mark.parametrize(
    ("expr", "count", "needle"),
    [
        ("[:1000]", 40, "1000 is past the end of the pack (40 samples)"),
        ("[50:]", 40, "past the end"),
        ("[10%:11%]", 40, "selects none of the 40 samples"),
        ("[30:50%]", 40, "start after its stop"),
        ("[:20%]+[10%:30%]", 40, "overlap (4 samples in both)"),
        ("[:10]+[5:20]", 40, "overlap"),
    ],
)
def test_what_cannot_be_resolved_is_named(expr: str, count: int, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        ids(expr, count)
    assert needle in str(err.value) and expr.split("+")[0] in str(err.value)
