"""End to end: a ResNet-18 training loop fed by batchd vs by the DataLoader.

``python -m benchmarks.bench_e2e [--device auto|cuda|cpu] [--json]`` trains a
ResNet-18 (defined here: torchvision is not installable beside the CPU torch build)
on the generated 256x256 set, random crop 224 + flip, batch 256, and reports
training steps per second for each feeder:

    synthetic           one batch already on the device, reused: the step's ceiling
    batchd_tcp          batchd.Client.iterate over TCP to 127.0.0.1 (shared-memory bodies)
    batchd_tcp_bytes    the same with --no-shm: every body crosses the socket
    batchd_uds          the same over a unix socket (shared-memory bodies)
    dataloader_memmap   torch DataLoader over the same np.memmap, W workers, pinned

**GPU busy share** is a feeder's steps/s over the synthetic ceiling's, measured in
the same run: the share of the time the device would be computing if data were free.
It is left out on the CPU, where the loader and the model share the same cores.
Every feeder does the same on-device work: uint8 NHWC -> float NCHW, normalise,
forward, backward, SGD step (bf16 autocast and channels_last on CUDA).

Each feeder runs ``--warmup`` untimed steps (cuDNN autotuning, server and worker
start-up, page cache), then ``--repeats`` timed spans of ``--steps`` steps; the
report gives the median (min-max). The timed spans end in a device synchronise, so
queued work is counted.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ._data import CLASSES, ImageSet, ensure_packs, image_set
from ._harness import environment, page_cache_bytes, serve, stat

__all__ = ["FEEDERS", "main", "parse_args", "resnet18", "run"]

FEEDERS: tuple[str, ...] = (
    "synthetic",
    "batchd_tcp",
    "batchd_tcp_bytes",
    "batchd_uds",
    "dataloader_memmap",
)
_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def resnet18(num_classes: int) -> Any:
    """ResNet-18 (He et al. 2015, torchvision's layout: BasicBlock x [2, 2, 2, 2])."""
    from torch import nn

    def conv_bn(cin: int, cout: int, k: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout)]

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.body = nn.Sequential(
                *conv_bn(cin, cout, 3, stride), nn.ReLU(inplace=True), *conv_bn(cout, cout, 3, 1)
            )
            self.skip: nn.Module = (
                nn.Sequential(*conv_bn(cin, cout, 1, stride))
                if stride != 1 or cin != cout
                else nn.Identity()
            )
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            return self.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [*conv_bn(3, 64, 7, 2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    return nn.Sequential(*layers)


# --- feeders: each yields (uint8 NHWC images, int64 labels) on the host, epoch after epoch --


def _batchd_batches(url: str, name: str, batch_size: int, crop: int) -> Iterator[Any]:
    import torch

    import batchd

    augment = [{"op": "random_crop", "size": [crop, crop]}, {"op": "hflip", "p": 0.5}]
    with batchd.Client(
        url, name, batch_size=batch_size, seed=0, drop_last=True, augment=augment
    ) as client:
        for epoch in itertools.count():
            for batch in client.iterate(epoch):
                yield torch.from_numpy(batch["image"]), torch.from_numpy(batch["label"])


def _dataloader_batches(images: ImageSet, batch_size: int, crop: int, workers: int) -> Any:
    import torch
    from torch.utils.data import DataLoader

    from .bench_loaders import _MemmapDataset, _seed_worker

    loader: DataLoader[Any] = DataLoader(
        _MemmapDataset(images.array_path, images.labels, crop),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        worker_init_fn=_seed_worker,
        persistent_workers=True,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
    )

    def batches() -> Iterator[Any]:
        while True:
            for batch in loader:
                yield batch["image"], batch["label"]

    return batches()


# --- the loop ------------------------------------------------------------------------------


def _trainer(device: Any, num_classes: int) -> Callable[[Any, Any], Any]:
    """``step(images_uint8_nhwc, labels)``: one SGD step on ``device``; returns the loss."""
    import torch

    cuda = device.type == "cuda"
    model = resnet18(num_classes).to(device)
    if cuda:
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor(_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(_STD, device=device).view(1, 3, 1, 1)

    def step(x: Any, y: Any) -> Any:
        x = x.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
        x = (x - mean) / std
        if cuda:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def _time_feeder(
    batches: Iterator[Any], step: Callable[[Any, Any], Any], device: Any, args: argparse.Namespace
) -> dict[str, Any]:
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step(*next(batches))
    sync()
    warmup_s = time.perf_counter() - t0
    rates: list[float] = []
    loss = float("nan")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(args.steps):
            out = step(*next(batches))
        sync()
        rates.append(args.steps / (time.perf_counter() - t0))
        loss = float(out.detach().float().cpu())
    steps_per_s = stat(rates)
    return {
        "steps_per_s": steps_per_s.as_dict(),
        "images_per_s_median": steps_per_s.median * args.batch_size,
        "warmup_s": warmup_s,
        "last_loss": loss,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    images = image_set(args.work_dir, size=args.size, count=args.count)
    ensure_packs(images)
    record: dict[str, Any] = {
        "benchmark": "bench_e2e",
        "model": "resnet18",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": args.batch_size,
        "crop": args.crop,
        "images": args.count,
        "image_size": args.size,
        "workers": args.workers,
        "steps": args.steps,
        "warmup_steps": args.warmup,
        "repeats": args.repeats,
        "environment": environment(),
        "feeders": {},
        "errors": [],
    }
    for feeder in args.feeders:
        step = _trainer(device, len(CLASSES))  # a fresh model per feeder: same work each
        print(f"[e2e] {feeder} ...", file=sys.stderr, flush=True)
        try:
            if feeder == "synthetic":
                gen = torch.Generator().manual_seed(0)
                shape = (args.batch_size, args.crop, args.crop, 3)
                x = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).to(device)
                y = torch.randint(0, len(CLASSES), (args.batch_size,), generator=gen).to(device)
                res = _time_feeder(itertools.repeat((x, y)), step, device, args)
            elif feeder.startswith("batchd"):
                extra = ["--threads", str(args.workers)]
                extra += ["--no-shm"] if feeder == "batchd_tcp_bytes" else []
                with serve(images.data_dir, uds=feeder == "batchd_uds", args=extra) as server:
                    feed = _batchd_batches(server.url, images.name, args.batch_size, args.crop)
                    res = _time_feeder(feed, step, device, args)
            elif feeder == "dataloader_memmap":
                feed = _dataloader_batches(images, args.batch_size, args.crop, args.workers)
                res = _time_feeder(feed, step, device, args)
                del feed  # stops the persistent workers
            else:
                raise ValueError(f"unknown feeder {feeder!r}; known: {', '.join(FEEDERS)}")
        except Exception as exc:  # one broken feeder must not lose the others
            record["errors"].append({"feeder": feeder, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rate = res["steps_per_s"]["median"]
        print(f"[e2e] {feeder}: {rate:.2f} steps/s", file=sys.stderr, flush=True)
        record["feeders"][feeder] = res
    # On the CPU the loader and the model share the cores, so a ratio to the ceiling
    # says nothing about a device kept busy: it is reported only for an accelerator.
    ceiling = record["feeders"].get("synthetic", {}).get("steps_per_s", {}).get("median")
    for res in record["feeders"].values():
        busy = bool(ceiling) and device.type != "cpu"
        res["busy_share"] = res["steps_per_s"]["median"] / ceiling if busy else None
    resident, total = page_cache_bytes([images.pack_dir])
    record["page_cache_after"] = {"pack_resident_bytes": resident, "pack_bytes": total}
    return record


def _table(record: dict[str, Any]) -> str:
    lines = [
        f"ResNet-18 on {record['device_name']}, batch {record['batch_size']}, "
        f"crop {record['crop']} + flip, {record['workers']} loader workers/threads",
        "",
        "| feeder | steps/s | images/s | GPU busy share |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, res in record["feeders"].items():
        s = res["steps_per_s"]
        share = "" if res["busy_share"] is None else f"{res['busy_share']:.0%}"
        lines.append(
            f"| {name} | {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f}) "
            f"| {res['images_per_s_median']:,.0f} | {share} |"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench_e2e", description=__doc__)
    p.add_argument("--device", default="auto", help="auto (cuda if there), cuda or cpu")
    p.add_argument("--count", type=int, default=20_000, help="images in the generated set")
    p.add_argument("--size", type=int, default=256, help="stored image size")
    p.add_argument("--crop", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--steps", type=int, default=50, help="steps per timed span")
    p.add_argument("--warmup", type=int, default=15)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--feeders", default=",".join(FEEDERS), help="comma-separated subset")
    p.add_argument("--work-dir", type=Path, default=Path(__file__).parent / "_work")
    p.add_argument("--json", action="store_true", help="print the JSON record on stdout")
    args = p.parse_args(argv)
    args.feeders = tuple(f for f in args.feeders.split(",") if f)
    unknown = sorted(set(args.feeders) - set(FEEDERS))
    if unknown:
        p.error(f"unknown feeders {unknown}; known: {', '.join(FEEDERS)}")
    if args.crop > args.size or min(args.count, args.batch_size, args.steps, args.repeats) < 1:
        p.error("need crop <= size and count, batch-size, steps, repeats >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    record = run(args := parse_args(argv))
    print(json.dumps(record, indent=2) if args.json else _table(record))
    return 1 if record["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
