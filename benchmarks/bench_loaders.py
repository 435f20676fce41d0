"""Contenders 1-5: one trainer's loader, the same decoded work everywhere.

Every contender delivers, per batch of 256, uint8 RGB images (random crop 224 of the
256x256 stored image + horizontal flip with p=0.5, or flip only for the 64x64 set)
and int64 labels, in a fresh random order each epoch. Nothing trains: the number is
how fast a loader can feed a trainer, in images per second.

    1 batchd_tcp / batchd_uds   batchd.Client.iterate over the raw pack (TCP to 127.0.0.1,
                                unix socket): both same-host, so bodies in shared memory
      batchd_tcp_bytes          TCP with --no-shm: every body crosses the socket, as it
                                does for a trainer on another host or in another container
      batchd_preadv             TCP with --no-leases: the server reads with preadv, as it
                                must where it cannot take read leases
    2 dataloader_files          torch DataLoader, 2 workers, cv2.imread per sample
    3 dataloader_memmap         torch DataLoader, 2 workers, np.memmap opened per worker
    4 keras_files               keras.utils.PyDataset reading the files per batch
    5 batchd_encoded            batchd over the encoded (JPEG) pack: the server decodes

The DataLoaders use ``persistent_workers=True`` so worker start-up is paid in the
warm-up pass, not in the timed ones: the best case for them.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray

from ._data import ImageSet, ensure_packs
from ._harness import BenchConfig, Measurement, measure, serve

__all__ = ["CONTENDERS", "WORKLOADS", "Workload", "run"]


@dataclass(frozen=True, kw_only=True)
class Workload:
    name: str
    size: int
    """Stored image size (the set to read)."""
    crop: int | None
    """Random crop size, or None for flip only."""

    def augment(self) -> list[dict[str, Any]]:
        ops: list[dict[str, Any]] = []
        if self.crop is not None:
            ops.append({"op": "random_crop", "size": [self.crop, self.crop]})
        ops.append({"op": "hflip", "p": 0.5})
        return ops


WORKLOADS: tuple[Workload, ...] = (
    Workload(name="crop224_flip", size=256, crop=224),
    Workload(name="flip64", size=64, crop=None),
)

#: Contender name -> (issue number, label in tables and plots).
CONTENDERS: dict[str, tuple[int, str]] = {
    "batchd_tcp": (1, "batchd, TCP"),
    "batchd_uds": (1, "batchd, unix socket"),
    "batchd_tcp_bytes": (1, "batchd, TCP, --no-shm (bytes over the socket)"),
    "batchd_preadv": (1, "batchd, TCP, --no-leases (preadv)"),
    "dataloader_files": (2, "DataLoader x2, cv2.imread per file"),
    "dataloader_memmap": (3, "DataLoader x2, np.memmap"),
    "keras_files": (4, "keras PyDataset, files per batch"),
    "batchd_encoded": (5, "batchd, JPEG pack (server decodes)"),
}


# --- the per-sample work every non-batchd contender does ---------------------------------


def _augment(img: NDArray[np.uint8], crop: int | None, rng: random.Random) -> NDArray[np.uint8]:
    if crop is not None:
        h, w = img.shape[:2]
        y = rng.randrange(h - crop + 1)
        x = rng.randrange(w - crop + 1)
        img = img[y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        img = np.asarray(
            cv2.flip(img, 1), dtype=np.uint8
        )  # ~10x faster than img[:, ::-1] followed by a copy
    if not img.flags.c_contiguous or not img.flags.writeable:
        img = np.array(img)  # a memmap view (read-only) or a crop's strided view
    return img


def _read_file(path: Path) -> NDArray[np.uint8]:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cv2.imread could not read {path}")
    return np.asarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)


_worker_rng = random.Random(0)


def _seed_worker(worker_id: int) -> None:
    import torch

    cv2.setNumThreads(1)  # two workers on two cores: cv2's own threads only contend
    global _worker_rng
    _worker_rng = random.Random(int(torch.initial_seed()) % (2**63))


class _FilesDataset:
    """The per-file way: one cv2.imread per sample (contender 2)."""

    def __init__(self, files: tuple[Path, ...], labels: NDArray[np.int64], crop: int | None):
        self.files, self.labels, self.crop = files, labels, crop

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        img = _augment(_read_file(self.files[i]), self.crop, _worker_rng)
        return {"image": img, "label": int(self.labels[i])}


class _MemmapDataset:
    """The same pixels as an ``np.memmap``, opened lazily in each worker (contender 3)."""

    def __init__(self, path: Path, labels: NDArray[np.int64], crop: int | None):
        self.path, self.labels, self.crop = path, labels, crop
        self._arr: NDArray[np.uint8] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self._arr is None:  # opened after fork, so each worker maps it itself
            self._arr = np.load(self.path, mmap_mode="r")
        img = _augment(self._arr[i], self.crop, _worker_rng)
        return {"image": img, "label": int(self.labels[i])}


def _dataloader_pass(dataset: Any, cfg: BenchConfig) -> Callable[[int], int]:
    import torch
    from torch.utils.data import DataLoader

    gen = torch.Generator()
    loader: DataLoader[Any] = DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=cfg.workers,
        worker_init_fn=_seed_worker,
        persistent_workers=True,
        generator=gen,
        timeout=cfg.pass_timeout_s,
    )

    def run_pass(epoch: int) -> int:
        gen.manual_seed(epoch)
        n = 0
        for batch in loader:
            n += int(batch["label"].shape[0])
        return n

    return run_pass


# --- keras ----------------------------------------------------------------------------


def _keras_dataset(images: ImageSet, crop: int | None, batch_size: int) -> Any:
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    class FilesPyDataset(keras.utils.PyDataset):  # type: ignore[misc]  # keras is untyped
        def __init__(self) -> None:
            super().__init__(workers=1, use_multiprocessing=False)
            self.order = np.arange(images.count)
            self.rng = random.Random(0)

        def set_epoch(self, epoch: int) -> None:
            self.order = np.random.default_rng(epoch).permutation(images.count)

        def __len__(self) -> int:
            return -(-images.count // batch_size)

        def __getitem__(self, k: int) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
            idx = self.order[k * batch_size : (k + 1) * batch_size]
            x = np.stack([_augment(_read_file(images.files[i]), crop, self.rng) for i in idx])
            return x, images.labels[idx]

    return FilesPyDataset()


# --- batchd ---------------------------------------------------------------------------


def _batchd_pass(url: str, name: str, workload: Workload, cfg: BenchConfig) -> Callable[[int], int]:
    import batchd

    client = batchd.Client(url, name, batch_size=cfg.batch_size, seed=0, augment=workload.augment())

    def run_pass(epoch: int) -> int:
        n = 0
        for batch in client.iterate(epoch):
            n += int(batch["index"].shape[0])
        return n

    return run_pass


# --- entry ----------------------------------------------------------------------------

#: The raw-pack batchd contenders: the server's extra arguments and the note in the record.
_BATCHD: dict[str, tuple[list[str], str]] = {
    "batchd_tcp": ([], "raw pack; shared-memory bodies (loopback)"),
    "batchd_uds": ([], "raw pack; shared-memory bodies (unix socket)"),
    "batchd_tcp_bytes": (["--no-shm"], "raw pack; bodies over the socket"),
    "batchd_preadv": (["--no-leases"], "raw pack, read with preadv (the fallback)"),
}


def run(
    contender: str, workload: Workload, images: ImageSet, cfg: BenchConfig
) -> Iterator[Measurement]:
    """Measure one contender on one workload.

    A generator: it yields nothing for a pair that does not apply.
    """
    _, label = CONTENDERS[contender]
    common: dict[str, Any] = {
        "contender": contender,
        "workload": workload.name,
        "label": label,
        "repeats": cfg.repeats,
    }
    if contender == "dataloader_files":
        ds = _FilesDataset(images.files, images.labels, workload.crop)
        yield measure(run_pass=_dataloader_pass(ds, cfg), notes=f"{images.ext} files", **common)
    elif contender == "dataloader_memmap":
        ds2 = _MemmapDataset(images.array_path, images.labels, workload.crop)
        yield measure(run_pass=_dataloader_pass(ds2, cfg), notes="array.npy", **common)
    elif contender == "keras_files":
        seq = _keras_dataset(images, workload.crop, cfg.batch_size)

        def keras_pass(epoch: int) -> int:
            # The way model.fit(seq) with workers=1 reads it: __getitem__ in order.
            seq.set_epoch(epoch)
            return sum(len(seq[k][1]) for k in range(len(seq)))

        yield measure(run_pass=keras_pass, notes="workers=1, in the trainer process", **common)
    elif contender in _BATCHD:
        ensure_packs(images)
        args, note = _BATCHD[contender]
        with serve(images.data_dir, uds=contender == "batchd_uds", args=args) as server:
            run_pass = _batchd_pass(server.url, images.name, workload, cfg)
            yield measure(run_pass=run_pass, notes=note, **common)
    elif contender == "batchd_encoded":
        if workload.size < 128:
            return  # the JPEG pack is the 256 set's; the 64 set is PNG
        ensure_packs(images, encoded=True)
        with serve(images.data_dir) as server:
            run_pass = _batchd_pass(server.url, f"{images.name}_jpeg", workload, cfg)
            yield measure(run_pass=run_pass, notes="encoded (JPEG) pack, TCP", **common)
    else:
        raise ValueError(f"unknown contender {contender!r}; known: {sorted(CONTENDERS)}")
