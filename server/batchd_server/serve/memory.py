"""The memory this server may use: its cgroup's limit (v1 or v2) or the machine's RAM.

Everything the server holds is charged to that one budget: its own heap, the shared
batch cache (in ``/dev/shm`` for same-host clients, which cannot be reclaimed while
cached), and the page cache holding the packs. The defaults are sized from it
(:func:`plan`): a container with a 2 GiB limit must not be OOM-killed for caching
batches, and a pack bigger than the budget is read with ``preadv`` ahead of need
rather than through its mapping (docs/reliability.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..format import Dataset

__all__ = ["CGROUP", "MemoryPlan", "memory_limit", "plan"]

#: :attr:`MemoryPlan.source` when the budget is the cgroup's memory limit.
CGROUP = "the cgroup memory limit"

log = logging.getLogger("batchd.engine")

_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as about 2**63
_CGROUP = Path("/sys/fs/cgroup")


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def _cgroup_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = _CGROUP
) -> int | None:
    """The tightest memory limit on this process's cgroup and its ancestors, if any."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "" and (root / "cgroup.controllers").exists():  # v2
            base, name = root, "memory.max"
        elif "memory" in controllers.split(","):  # v1
            base, name = root / "memory", "memory.limit_in_bytes"
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            got = _read_int(path / name)
            if got is not None:
                limits.append(got)
            if path == base or base not in path.parents:
                break
            path = path.parent
    return min(limits) if limits else None


def _ram() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError):
        return 1 << 40


def memory_limit() -> tuple[int, str]:
    """(bytes, where that figure comes from): the cgroup limit if below RAM, else RAM."""
    ram = _ram()
    cg = _cgroup_limit()
    if cg is not None and cg < ram:
        return cg, CGROUP
    return ram, "the machine's RAM"


@dataclass(frozen=True, slots=True)
class MemoryPlan:
    """What the budget allows; every figure is logged at start."""

    budget: int
    source: str
    cache_bytes: int
    """The shared batch cache (and so the ``/dev/shm`` bodies it keeps)."""
    idle_body_bytes: int
    """Body buffers kept for reuse beyond those in use."""
    readahead_bytes: int
    """Pack bytes announced to the kernel ahead of need, shared by the active jobs."""
    compute_bytes: int
    """Batch bodies being computed at once (more requests wait their turn)."""
    direct_reads: bool = True
    """Read the image fields of a pack that does not fit past the page cache (O_DIRECT)."""

    def fits(self, pack_bytes: int) -> bool:
        """Whether a pack of this size can stay in the page cache beside everything else."""
        return pack_bytes + self.cache_bytes + self.idle_body_bytes <= self.budget * 3 // 4

    def place(self, ds: Dataset) -> None:
        """Choose how ``ds`` is read: through its mapping only if it fits the budget."""
        if not self.fits(ds.nbytes) and ds.unmapped is None:
            # Read through the mapping, a pack bigger than memory thrashes (a reclaimed
            # page faults back 4 KiB at a time): whole-sample reads, announced ahead.
            ds.set_read_path(
                f"{ds.nbytes >> 20} MiB pack > 3/4 of the {self.budget >> 20} MiB "
                f"memory budget ({self.source})",
                direct=self.direct_reads,
            )
            log.info("%s: reads %s", ds.name, ds.reads)


def plan(
    cache_bytes: int | None = None, budget: int | None = None, *, direct_reads: bool = True
) -> MemoryPlan:
    """Size the caches from the budget; an explicit ``cache_bytes`` is kept as given."""
    if budget is None:
        budget, source = memory_limit()
    else:
        source = "--memory-budget"
    auto_cache = min(512 << 20, budget // 8)
    return MemoryPlan(
        budget=budget,
        source=source,
        cache_bytes=auto_cache if cache_bytes is None else cache_bytes,
        idle_body_bytes=min(128 << 20, budget // 16),
        readahead_bytes=max(16 << 20, min(256 << 20, budget // 6)),
        compute_bytes=budget // 4,
        direct_reads=direct_reads,
    )
