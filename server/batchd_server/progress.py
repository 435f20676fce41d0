"""Progress bars for long jobs (packing, verifying): tqdm on stderr, or nothing."""

from __future__ import annotations

import sys
from typing import Any

__all__: list[str] = []


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
