"""The real image on a real engine: build it, serve a pack, read an exact epoch, stop.

Runs where a Docker engine answers (``docker info``) and a base image is at hand:
``BATCHD_TEST_BASE_IMAGE`` names one (an offline base built as docs/deploy.md says),
else the Dockerfile's default is used if the engine has it or can pull it. Only host
networking: the container listens on a free loopback port, and no bridge network or
published port is ever made. Every container and image the test makes is removed by
its id at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from batchd import Client
from serverproc import free_port, tiny_pack

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "python:3.11.11-slim-bookworm"


def _docker(*args: str, timeout: float = 120, check: bool = True) -> str:
    done = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args)}: {done.stderr.strip()[-1500:]}")
    return done.stdout.strip()


def _engine_problem() -> str | None:
    if shutil.which("docker") is None:
        return "no docker CLI on PATH (apt-get install docker.io)"
    try:
        _docker("info", timeout=20)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        return (
            f"no Docker engine answers ({exc}); start one: dockerd --bridge=none --iptables=false"
        )
    return None


@pytest.fixture(scope="module")
def image() -> Iterator[str]:
    problem = _engine_problem()
    if problem:
        pytest.skip(problem)
    base = os.environ.get("BATCHD_TEST_BASE_IMAGE", DEFAULT_BASE)
    if not _docker("images", "-q", base, check=False):
        try:
            _docker("pull", base, timeout=300)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            pytest.skip(
                f"base image {base} is not here and cannot be pulled ({exc}); set "
                "BATCHD_TEST_BASE_IMAGE to a local base (docs/deploy.md, offline build)"
            )
    tag = f"batchd-test:{uuid.uuid4().hex[:12]}"
    _docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base}",
        "-f", str(ROOT / "docker" / "Dockerfile"), "-t", tag, str(ROOT), timeout=900,
    )  # fmt: skip
    try:
        yield tag
    finally:
        _docker("rmi", "-f", tag, check=False)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def test_the_image_serves_an_exact_epoch_and_stops_on_sigterm(image: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tiny_pack(data / "tiny", n=300, hw=16)
    data.chmod(0o755)
    port = free_port()
    cid = _docker(
        "run", "-d", "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-e", "BATCHD_TOKEN=secret", "-v", f"{data}:/data:ro", image,
        "batchd", "serve", "--data", "/data", "--host", "127.0.0.1", "--port", str(port),
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not _healthy(url):
            assert time.monotonic() < deadline, _docker("logs", cid, check=False)
            time.sleep(0.2)
        client = Client(url, "tiny", batch_size=32, seed=5, token="secret")
        ids = np.concatenate([b["index"] for b in client.iterate(0)])
        assert sorted(ids.tolist()) == list(range(300))  # every sample exactly once
        logs = _docker("logs", cid, check=False)
        started = time.monotonic()
        _docker("stop", "--time", "30", cid, timeout=60)
        stopped_s = time.monotonic() - started
        assert stopped_s < 10, f"SIGTERM took {stopped_s:.1f} s to drain and exit"
        state = _docker("inspect", "-f", "{{.State.ExitCode}}", cid)
        assert state == "0", f"exit code {state}; log:\n{logs[-2000:]}"
    finally:
        _docker("rm", "-f", cid, check=False)
