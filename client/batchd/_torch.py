"""PyTorch: an ``IterableDataset`` of ready batches.

Imported only by :meth:`batchd.Client.torch`, so ``import batchd`` never imports torch.
Use ``DataLoader(ds, batch_size=None, num_workers=W)``: batches are already made, and
worker ``w`` of ``W`` takes batches ``w, w+W, w+2W, ...`` so that the workers together
yield this rank's epoch exactly once; the DataLoader interleaves them back into order.
Tensors come from ``torch.from_numpy`` (no copy).

Which epoch a pass serves: ``set_epoch(e)`` works like ``DistributedSampler.set_epoch``
and reaches the workers whether or not they are persistent, forked or spawned; without
it each new pass over the DataLoader is the next epoch. Both live in a small array of
shared memory created with the dataset, so before any worker starts: ``[0]`` is the
epoch last set, ``[1 + w]`` the passes worker ``w`` (the main process counts as worker
0) has started since. A worker serves epoch ``[0] + [1 + w]`` and counts the pass, so
workers of one DataLoader agree without talking to each other.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from multiprocessing.context import get_spawning_popen
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .wire import MAX_SEED, check_int

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["MAX_WORKERS", "TorchDataset", "resolve_shard"]

#: DataLoader workers one dataset can count passes for (8 bytes of shared memory each).
MAX_WORKERS = 1024


def resolve_shard(client: Client, rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): given here, else given to the client, else torch.distributed."""
    if rank is not None or world_size is not None:
        w = client.world_size if world_size is None else world_size
        r = client.rank if rank is None else rank
        if not 0 <= r < w:
            raise ValueError(f"rank must be in 0..{w - 1} for world_size={w}, got {r}")
        return r, w
    if client.shard_given:
        return client.rank, client.world_size
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return client.rank, client.world_size


def _shared(epoch: int, passes: list[int] | None = None) -> Any:
    # Raw: one process writes each slot (the main process [0], worker w [1 + w]).
    arr = multiprocessing.RawArray("q", 1 + MAX_WORKERS)
    arr[0] = epoch
    for w, n in enumerate(passes or ()):
        arr[1 + w] = n
    return arr


class TorchDataset(IterableDataset[dict[str, torch.Tensor]]):
    """This rank's epoch as dicts of tensors (every field plus ``"index"``)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._state = _shared(client.epoch)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if get_spawning_popen() is None:
            # Pickled outside a worker start (torch.save, a copy): shared memory can
            # only travel to a process being started, so this copy gets its own.
            arr = state.pop("_state")
            state["_snapshot"] = list(arr)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        snapshot = state.pop("_snapshot", None)
        self.__dict__.update(state)
        if snapshot is not None:
            self._state = _shared(snapshot[0], snapshot[1:])

    @property
    def epoch(self) -> int:
        """The epoch the next pass serves (worker 0's, which is the main process's too)."""
        return int(self._state[0] + self._state[1])

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` next (call before each epoch, like DistributedSampler).

        Reaches persistent workers too; passes after it without another call serve
        ``epoch + 1``, ``epoch + 2``, ...
        """
        try:
            e = check_int("epoch", epoch, 0, MAX_SEED)
        except ValueError as exc:
            raise ValueError(f"set_epoch: {exc}") from None
        self._state[0] = e
        for i in range(1, 1 + MAX_WORKERS):
            self._state[i] = 0

    def __len__(self) -> int:
        return len(self.client)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # A plain method, not a generator: the pass is counted when iter() is called,
        # once per worker per pass, whether or not the worker's share is empty.
        worker = get_worker_info()
        w, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        if w >= MAX_WORKERS:
            raise ValueError(
                f"DataLoader worker {w}: a batchd TorchDataset counts passes for at most "
                f"{MAX_WORKERS} workers; use fewer (they only wait on the network)"
            )
        epoch = int(self._state[0] + self._state[1 + w])
        self._state[1 + w] += 1
        return self._iterate(epoch, w, n_workers)

    def _iterate(self, epoch: int, w: int, n_workers: int) -> Iterator[dict[str, torch.Tensor]]:
        expect = self.client.refresh()
        batches = self.client.batches(epoch, range(w, expect.batches, n_workers), info=expect)
        try:
            for batch in batches:
                yield {name: torch.from_numpy(array) for name, array in batch.items()}
        finally:
            batches.close()
