"""The public API is exactly the package's sorted `__all__`."""

from __future__ import annotations

import types

import batchd

#: Public modules of the distribution (imported on their own, not re-exported).
PUBLIC_MODULES = {"buffers", "testing", "wire"}


def test_all_is_sorted_and_complete() -> None:
    names = [n for n in vars(batchd) if not n.startswith("_") or n == "__version__"]
    modules = {n for n in names if isinstance(getattr(batchd, n), types.ModuleType)}
    assert modules <= PUBLIC_MODULES
    public = [n for n in names if n not in modules]
    assert batchd.__all__ == sorted(batchd.__all__)
    assert sorted(public) == batchd.__all__


def test_exported_members_belong_to_the_package() -> None:
    for name in batchd.__all__:
        member = getattr(batchd, name)
        if callable(member):
            assert member.__module__ == "batchd", name


def test_every_error_is_a_batchd_error() -> None:
    errors = [getattr(batchd, n) for n in batchd.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, batchd.BatchdError) for e in errors)
