"""K-fold cross-validation over one pack, as two split expressions per fold."""

from __future__ import annotations

from .wire import SplitBound, SplitSlice, check_int, format_split

__all__ = ["kfold"]

#: Fold boundaries are whole percents, so folds number at most this many.
MAX_FOLDS = 100


def kfold(n_folds: int, fold: int) -> tuple[str, str]:
    """``(train_split, val_split)`` for fold ``fold`` (0-based) of ``n_folds``.

    Fold ``f`` validates on ``[b(f):b(f+1)]`` of the split order and trains on the
    rest, with ``b(i) = round(100 * i / n_folds)`` percent (halves up). Over all folds
    the validation parts are disjoint and cover the pack; each fold is within one
    percent of the pack of ``1 / n_folds`` (exactly that when ``n_folds`` divides 100).
    Pass the same ``split_seed`` (and ``stratify``) to every client of every fold::

        train, val = batchd.kfold(5, 0)   # ('[20%:]', '[:20%]')
    """
    n = check_int("n_folds", n_folds, 2, MAX_FOLDS)
    f = check_int("fold", fold, 0, n - 1)
    lo, hi = ((200 * i + n) // (2 * n) for i in (f, f + 1))
    val = SplitSlice(
        SplitBound(lo, True) if lo else None, SplitBound(hi, True) if hi < 100 else None
    )
    train = []
    if lo > 0:
        train.append(SplitSlice(None, SplitBound(lo, True)))
    if hi < 100:
        train.append(SplitSlice(SplitBound(hi, True), None))
    return format_split(train), format_split([val])
