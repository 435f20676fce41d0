"""PyTorch: an ``IterableDataset`` of ready batches.

Imported only by :meth:`batchd.Client.torch`, so ``import batchd`` never imports torch.
Use ``DataLoader(ds, batch_size=None, num_workers=W)``: batches are already made, and
worker ``w`` of ``W`` takes batches ``w, w+W, w+2W, ...`` so that the workers together
yield this rank's epoch exactly once; the DataLoader interleaves them back into order.
Tensors come from ``torch.from_numpy`` (no copy). ``set_epoch(e)`` works like
``DistributedSampler.set_epoch``; with ``persistent_workers=True`` the workers keep the
epoch they started with, so leave that off (workers are cheap: they hold no data).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from torch.utils.data import IterableDataset, get_worker_info

if TYPE_CHECKING:
    from ._client import Client

__all__ = ["TorchDataset", "resolve_shard"]


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


class TorchDataset(IterableDataset[dict[str, torch.Tensor]]):
    """This rank's epoch as dicts of tensors (every field plus ``"index"``)."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.epoch = client.epoch

    def set_epoch(self, epoch: int) -> None:
        """Serve epoch ``epoch`` next (call before each epoch, like DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.client)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker = get_worker_info()
        w, n_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        expect = self.client.refresh()
        batches = self.client.batches(self.epoch, range(w, expect.batches, n_workers), info=expect)
        try:
            for batch in batches:
                yield {name: torch.from_numpy(array) for name, array in batch.items()}
        finally:
            batches.close()
