"""Fixtures of the serving tests (a module's own ``data`` fixture overrides this one)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serverproc import tiny_pack


@pytest.fixture
def data(tmp_path: Path) -> Path:
    """A data root holding ``tiny``: 40 raw 16x16 RGB samples whose label is their id."""
    root = tmp_path / "data"
    root.mkdir()
    tiny_pack(root / "tiny", n=40, hw=16)
    return root
