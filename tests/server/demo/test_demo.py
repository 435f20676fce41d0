"""The demo: its pack (idempotent, race-safe) and ``batchd demo`` end to end."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from batchd_server.demo import DEMO_NAME, ensure_demo_pack
from batchd_server.demo.synth import CLASSES, render_scene
from batchd_server.format import open_dataset
from batchd_server.format.header import HEADER_NAME

ROOT = Path(__file__).resolve().parents[3]


def test_demo_pack_holds_the_scenes(tmp_path: Path) -> None:
    out = ensure_demo_pack(tmp_path, n=24, size=48, seed=2)
    assert out == tmp_path / DEMO_NAME
    with open_dataset(out) as ds:
        assert ds.count == 24
        assert set(ds.fields) == {"image", "mask", "count", "label"}
        labels = np.asarray(ds.array("label"))
        assert labels.tolist() == [i % len(CLASSES) for i in range(24)]
        masks = np.asarray(ds.array("mask"))
        assert masks.shape == (24, 48, 48)
        # masks are lossless PNGs packed at their own size: exactly the rendered ones
        for i in (0, 7, 23):
            assert np.array_equal(masks[i], render_scene(i, size=(48, 48), seed=2).mask)
        counts = np.asarray(ds.array("count"))
        assert counts.tolist() == [render_scene(i, size=(48, 48), seed=2).count for i in range(24)]


def test_demo_pack_is_reused(tmp_path: Path) -> None:
    first = ensure_demo_pack(tmp_path, n=12, size=32)
    stamp = (first / HEADER_NAME).stat().st_mtime_ns
    again = ensure_demo_pack(tmp_path, n=999, size=64)  # an existing pack is returned as it is
    assert again == first and (again / HEADER_NAME).stat().st_mtime_ns == stamp


def test_demo_pack_race(tmp_path: Path) -> None:
    results: list[Path] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(ensure_demo_pack(tmp_path, n=40, size=32))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert results == [tmp_path / DEMO_NAME] * 3
    with open_dataset(tmp_path / DEMO_NAME) as ds:
        assert ds.count == 40
    assert [p.name for p in tmp_path.iterdir()] == [DEMO_NAME], "no temp dirs left behind"


@pytest.mark.slow
def test_batchd_demo_end_to_end(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from batchd_server.cli import main; main()"]
    args = ["demo", "--n", "300", "--epochs", "1", "--size", "64", "--workdir", str(tmp_path)]
    # its own process group: on a hang, kill the demo and the server it started together
    proc = subprocess.Popen(
        cmd + args,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"batchd demo hung; output:\n{out}")
    assert proc.returncode == 0, out
    assert "every one of the 240 samples of [:80%] came exactly once; 60 others" in out, out
    assert re.search(r"epoch 0 \(iterate only\): 240 images in [\d.]+ s, [\d,]+ images/s", out), out
    try:
        import torch  # noqa: F401
    except ImportError:
        assert "torch is not installed" in out
    else:
        assert re.search(
            r"epoch 1: 240 images .* loss [\d.]+, accuracy [\d.]+%; validation accuracy [\d.]+%",
            out,
        ), out
    assert "server stopped" in out
    url = re.search(r"at http://127\.0\.0\.1:(\d+)", out)
    assert url, out
    with socket.socket() as s:  # the server is gone, not left behind
        assert s.connect_ex(("127.0.0.1", int(url.group(1)))) != 0
    assert (tmp_path / "n300-64px-seed0" / DEMO_NAME / HEADER_NAME).is_file()
