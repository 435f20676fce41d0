"""Progress bars for long jobs (packing, verifying), and sizes as people read them."""

from __future__ import annotations

import sys
from typing import Any

__all__ = ["human_bytes"]


def human_bytes(n: int) -> str:
    """``n`` bytes as a person reads them: ``512 B``, ``3.0 MiB``, ``1.2 TiB``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


class _Bar:
    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def update(self, n: int) -> None:
        if self.inner is not None:
            self.inner.update(n)

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def progress_bar(total: int, desc: str, unit: str, enabled: bool | None) -> _Bar:
    """A tqdm bar on stderr; None means on when stderr is a TTY."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        return _Bar(None)
    from tqdm import tqdm

    return _Bar(
        tqdm(
            total=total,
            desc=desc,
            unit=unit,
            unit_scale=unit == "B",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.2,
        )
    )
