"""``batchd demo``: the whole path in one command, on data made on the spot.

    synth scenes (JPEG + mask PNG + CSV) ──pack──▶ DIR/shapes ──serve (subprocess, loopback)──▶
    Client.iterate(0) of the [:80%] split: every sample once, [80%:] held out ──▶
    tiny CNN for a few epochs on [:80%], validated on [80%:] (if torch)

:func:`ensure_demo_pack` is also what ``batchd serve --demo-if-empty`` uses, so the first
``docker compose up`` over an empty ``./data`` serves something.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
from numpy.typing import NDArray

from batchd import DatasetInfo

from ..errors import PackError
from ..format import HEADER_NAME
from ..pack import PackOptions, pack_csv
from .synth import CLASSES, make_scenes

__all__ = ["DEMO_NAME", "demo", "ensure_demo_pack"]

#: The demo dataset's name on the server.
DEMO_NAME = "shapes"
#: The demo trains on the first split and validates on the second: one pack, no repack.
TRAIN_SPLIT, VAL_SPLIT = "[:80%]", "[80%:]"

_HEALTH_TIMEOUT = 60.0  # seconds; a cold start imports fastapi, uvicorn and cv2
_STOP_TIMEOUT = 15.0
_START_ATTEMPTS = 3  # a free port can be taken between our probe and the server's bind


def ensure_demo_pack(
    root: str | Path, *, n: int = 2000, size: int = 128, seed: int = 0, quiet: bool = True
) -> Path:
    """The demo dataset ``root/shapes``, generated and packed unless it is already there.

    Idempotent, and safe when several processes race: each renders into its own
    temporary folder, the packer publishes atomically, and a loser that finds the
    winner's pack in place returns it. An existing pack is returned as it is,
    whatever ``n``, ``size`` and ``seed`` it was made with.
    """
    root = Path(root)
    out = root / DEMO_NAME
    if (out / HEADER_NAME).is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="batchd-scenes-") as tmp:
        info = make_scenes(tmp, n, size=(size, size), seed=seed)
        try:
            _pack(info.csv, out, size=size, quiet=quiet)
        except PackError:
            if (out / HEADER_NAME).is_file():  # another process won the race
                return out
            raise
    return out


def _pack(csv_path: Path, out: Path, *, size: int, quiet: bool) -> None:
    """Pack the scenes' CSV as ``batchd pack CSV OUT --mode raw --size SxS --mask-column mask``."""
    options = PackOptions(mode="raw", size=(size, size), progress=False if quiet else None)
    pack_csv(csv_path, out, mask_column="mask", options=options)


# --- the server, as a child process ---------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 20) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no server log)"
    return "\n".join(text[-lines:])


@dataclass(kw_only=True, slots=True)
class _Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        """SIGTERM (uvicorn drains and exits), then SIGKILL if it does not."""
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _start_server(data: Path, log: Path) -> _Server:
    """``batchd serve --data DATA`` on a free loopback port, once /healthz answers."""
    for _ in range(_START_ATTEMPTS):
        port = _free_port()
        cmd = [
            sys.executable, "-c", "from batchd_server.cli import main; main()",
            "serve", "--data", str(data), "--host", "127.0.0.1", "--port", str(port),
        ]  # fmt: skip
        with log.open("ab") as sink:
            # Same process group as the demo: whoever kills the demo's group kills the server too.
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=sink, stderr=sink)
        server = _Server(proc=proc, url=f"http://127.0.0.1:{port}", log=log)
        try:
            if _wait_healthy(server):
                return server
        except BaseException:
            server.stop()
            raise
    raise click.ClickException(
        f"the server did not start after {_START_ATTEMPTS} tries; its log ({log}) ends with:\n"
        + _tail(log)
    )


def _wait_healthy(server: _Server) -> bool:
    """True once /healthz answers 200; False if the process exited (e.g. port taken)."""
    deadline = time.monotonic() + _HEALTH_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            return False
        with (
            contextlib.suppress(OSError),  # not listening yet (URLError is an OSError)
            urllib.request.urlopen(f"{server.url}/healthz", timeout=1.0) as answer,
        ):
            if answer.status == 200:
                return True
        time.sleep(0.1)
    server.stop()
    raise click.ClickException(
        f"the server did not answer /healthz within {_HEALTH_TIMEOUT:.0f} s; "
        f"its log ({server.log}) ends with:\n{_tail(server.log)}"
    )


# --- what the trainer sees --------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class _EpochStats:
    samples: int = 0
    bytes: int = 0
    seconds: float = 0.0
    loss: float = 0.0
    correct: int = 0

    def line(self, label: str) -> str:
        rate = self.samples / max(self.seconds, 1e-9)
        mb = self.bytes / max(self.seconds, 1e-9) / 1e6
        text = (
            f"{label}: {self.samples} images in {self.seconds:.2f} s, "
            f"{rate:,.0f} images/s, {mb:,.1f} MB/s"
        )
        if self.correct or self.loss:
            acc = 100.0 * self.correct / max(self.samples, 1)
            text += f", loss {self.loss / max(self.samples, 1):.3f}, accuracy {acc:.1f}%"
        return text


Batch = dict[str, NDArray[Any]]
Step = Callable[[Batch], tuple[float, int]]  # a training step: (summed loss, correct)


def _run_epoch(
    batches: Iterator[Batch],
    expect: NDArray[np.int64],
    epoch: int,
    step: Step | None,
    first: list[Batch],
) -> _EpochStats:
    """Consume one epoch, check it holds the ids ``expect`` once each, and time it."""
    stats = _EpochStats()
    seen: list[NDArray[np.int64]] = []
    start = time.perf_counter()
    for batch in batches:
        if not first:
            first.append(batch)
        seen.append(np.asarray(batch["index"], np.int64))
        stats.samples += len(batch["index"])
        stats.bytes += sum(int(a.nbytes) for a in batch.values())
        if step is not None:
            loss, correct = step(batch)
            stats.loss += loss
            stats.correct += correct
    stats.seconds = time.perf_counter() - start
    ids = np.sort(np.concatenate(seen)) if seen else np.empty(0, np.int64)
    if not np.array_equal(ids, expect):
        missing = np.setdiff1d(expect, ids).size
        repeated = ids.size - np.unique(ids).size
        raise click.ClickException(
            f"epoch {epoch} was not exactly once: {ids.size} samples for {expect.size}, "
            f"{missing} missing, {repeated} repeated"
        )
    return stats


def _split_ids(client: Any) -> NDArray[np.int64]:
    """The pack ids of a client's split, from the ``index`` of one epoch."""
    ids = [np.asarray(b["index"], np.int64) for b in client.iterate(0)]
    return np.sort(np.concatenate(ids)) if ids else np.empty(0, np.int64)


def _torch_step(classes: int, seed: int) -> tuple[Step, Step] | None:
    """(a training step, a validation step) of a tiny CNN, or None without torch."""
    try:
        import torch
        from torch import nn
    except ImportError:
        return None
    torch.manual_seed(seed)
    # leave half the cores to the server, which augments the next batches meanwhile
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))

    def block(cin: int, cout: int) -> list[Any]:
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    model = nn.Sequential(
        nn.AvgPool2d(2),  # half resolution is plenty for telling shapes apart, and 4x cheaper
        *block(3, 16), *block(16, 32), *block(32, 64), *block(64, 64),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(64, classes),
    )  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")

    def step(batch: Batch) -> tuple[float, int]:
        # uint8 NHWC over the wire (4x less traffic than float32); scale on this side
        x = torch.from_numpy(batch["image"].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        y = torch.from_numpy(batch["label"].astype(np.int64).reshape(-1))
        logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad()
        (loss / len(y)).backward()
        opt.step()
        return float(loss.detach()), int((logits.argmax(1) == y).sum())

    def evaluate(batch: Batch) -> tuple[float, int]:
        model.eval()
        try:
            with torch.no_grad():
                x = torch.from_numpy(batch["image"].astype(np.float32) / 255.0).permute(0, 3, 1, 2)
                y = torch.from_numpy(batch["label"].astype(np.int64).reshape(-1))
                logits = model(x)
                return float(loss_fn(logits, y)), int((logits.argmax(1) == y).sum())
        finally:
            model.train()

    return step, evaluate


def _describe(first: Batch, info: DatasetInfo) -> None:
    click.echo(
        f"    dataset {info.name!r}: {info.pack_count} samples ({info.count} in {info.split}), "
        f"fingerprint {info.fingerprint}"
    )
    for name, f in info.fields.items():
        got = first.get(name)
        seen = f"{got.dtype} {tuple(got.shape)}" if got is not None else "not in the batch"
        click.echo(f"      {name:<6} packed {f.dtype} {f.shape}, a batch after augment: {seen}")
    labels = np.asarray(first["label"]).reshape(-1)
    counts = np.bincount(labels, minlength=len(CLASSES))
    shown = ", ".join(f"{c} {counts[k]}" for k, c in enumerate(CLASSES))
    click.echo(f"      label = class index into {list(CLASSES)}; first batch: {shown}")
    if "count" in first:
        mean = float(np.mean(first["count"]))
        click.echo(
            f"      count = shapes per image (a regression target); first batch mean {mean:.2f}"
        )


# --- the command -----------------------------------------------------------------------


@click.command("demo")
@click.option(
    "--n",
    "n",
    default=2000,
    show_default=True,
    type=click.IntRange(min=10),
    help="Scenes to generate.",
)
@click.option(
    "--size",
    default=64,
    show_default=True,
    type=click.IntRange(32, 1024),
    help="Image side in pixels.",
)
@click.option(
    "--epochs",
    default=10,
    show_default=True,
    type=click.IntRange(min=0),
    help="Training epochs (with torch).",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0))
@click.option(
    "--keep-serving", is_flag=True, help="Leave the server running at the end (Ctrl-C stops it)."
)
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the scenes' pack here and reuse it next time "
    "(default: a temporary folder, removed).",
)
@click.option("--quiet", is_flag=True, help="No progress bars; only the results.")
def demo(
    n: int,
    size: int,
    epochs: int,
    batch_size: int,
    seed: int,
    keep_serving: bool,
    workdir: Path | None,
    quiet: bool,
) -> None:
    """Generate synthetic scenes, pack them, serve them, and train on them."""

    def say(text: str) -> None:
        if not quiet:
            click.echo(text)

    temp = workdir is None
    work = Path(tempfile.mkdtemp(prefix="batchd-demo-")) if workdir is None else workdir
    # a pack per parameter set, so a reused --workdir never serves the wrong one
    data = work / f"n{n}-{size}px-seed{seed}"
    server: _Server | None = None
    try:
        say(f"1/4 generating {n} scenes ({size}x{size}) and packing them into {data}")
        t0 = time.perf_counter()
        pack = ensure_demo_pack(data, n=n, size=size, seed=seed, quiet=quiet)
        say(f"    ready in {time.perf_counter() - t0:.1f} s: {pack}")
        server = _start_server(data, work / "server.log")
        say(f"2/4 serving {data} at {server.url} (log: {work / 'server.log'})")
        _client_side(
            server.url, size=size, epochs=epochs, batch_size=batch_size, seed=seed, quiet=quiet
        )
        if keep_serving:
            _keep_serving(server, data)
    finally:
        if server is not None:
            server.stop()
            say("server stopped")
        if temp:
            shutil.rmtree(work, ignore_errors=True)


def _client_side(
    url: str, *, size: int, epochs: int, batch_size: int, seed: int, quiet: bool
) -> None:
    from batchd import Client

    augment: list[dict[str, Any]] = [
        {"op": "random_resized_crop", "size": [size, size], "scale": [0.5, 1.0]},
        {"op": "hflip", "p": 0.5},
    ]
    train = Client(
        url, DEMO_NAME, batch_size=batch_size, seed=seed, augment=augment, split=TRAIN_SPLIT
    )
    # Validation: the held-out rest of the same pack, in order, as it is (no augmentation).
    val = Client(url, DEMO_NAME, batch_size=batch_size, shuffle=False, split=VAL_SPLIT)
    with train, val:
        info = train.info
        held_out = _split_ids(val)
        click.echo(
            f"3/4 one epoch of the {TRAIN_SPLIT} split through Client.iterate: {len(train)} "
            f"batches of {batch_size}, augment={[a['op'] for a in augment]}"
        )
        first: list[Batch] = []
        rest = np.setdiff1d(np.arange(info.pack_count), held_out)
        stats = _run_epoch(
            train.iterate(0, progress=not quiet and sys.stderr.isatty()), rest, 0, None, first
        )
        click.echo("    " + stats.line("epoch 0 (iterate only)"))
        click.echo(
            f"    every one of the {info.count} samples of {TRAIN_SPLIT} came exactly once; "
            f"{held_out.size} others ({VAL_SPLIT}) are held out for validation"
        )
        if first:
            _describe(first[0], info)
        if epochs == 0:
            click.echo("4/4 --epochs 0: no training")
            return
        steps = _torch_step(len(CLASSES), seed)
        if steps is None:
            click.echo("4/4 torch is not installed: iterated only (pip install torch to train)")
            return
        step, evaluate = steps
        click.echo(
            f"4/4 training a tiny CNN on 'label' of {TRAIN_SPLIT} for {epochs} epoch(s), "
            f"validating on {VAL_SPLIT}"
        )
        for epoch in range(1, epochs + 1):
            batches = train.iterate(epoch, progress=not quiet and sys.stderr.isatty())
            stats = _run_epoch(batches, rest, epoch, step, [])
            checked = _run_epoch(val.iterate(0), held_out, 0, evaluate, [])
            acc = 100.0 * checked.correct / max(checked.samples, 1)
            click.echo(f"    {stats.line(f'epoch {epoch}')}; validation accuracy {acc:.1f}%")


def _keep_serving(server: _Server, data: Path) -> None:
    click.echo(
        f"\nbatchd is serving {data} at {server.url}; press Ctrl-C to stop it.\n"
        "Connect from Python:\n\n"
        "    import batchd\n"
        f'    client = batchd.Client("{server.url}", "{DEMO_NAME}", batch_size=64)\n'
        "    for batch in client.iterate(0):\n"
        '        print(batch["image"].shape, batch["label"][:8])\n'
        "        break\n"
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.proc.wait()
