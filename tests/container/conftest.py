"""A real Docker engine, a base image, a wheelhouse and the batchd image, once per session.

The tests here run the image and compose.yaml for real where an engine can be had:

- a daemon that answers (``docker info``) is used as it is; else, as root with ``dockerd``
  installed, the session starts its own with ``--bridge=none --iptables=false`` on a
  private socket, data root and exec root, and stops it at the end. No bridge network
  exists then, and nothing a test runs can take a private-range address: containers use
  host networking only and listen on free loopback ports;
- the base is ``BATCHD_TEST_BASE_IMAGE`` if set, else the Dockerfile's default if the
  engine has it or can pull it, else a stand-in built from Debian packages with
  ``debootstrap`` (docs/deploy.md, offline build);
- the wheelhouse is built on the host (``pip wheel``: the host reaches the index, a build
  may not), and the image is built offline from it, from a copy of the build context.

Where one of these cannot be had, the tests skip and say which and why. Every container,
image and daemon made here is removed by its id at the end.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from dockerengine import Docker, own_dockerd, standin_base, stop_dockerd

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BASE = "python:3.11.11-slim-bookworm"
# What the image is built from (docker/Dockerfile, [tool.hatch.build]) and what compose needs.
CONTEXT = ["pyproject.toml", "README.md", ".dockerignore", "compose.yaml", "client", "server"]


@pytest.fixture(scope="session")
def docker() -> Iterator[Docker]:
    if shutil.which("docker") is None:
        pytest.skip("no docker CLI on PATH (apt-get install docker.io; .ci/run does)")
    existing = Docker(os.environ.get("DOCKER_HOST"))
    if existing.answers():
        yield existing
        return
    if shutil.which("dockerd") is None or os.geteuid() != 0:
        pytest.skip("no Docker engine answers, and only root with dockerd installed may start one")
    root = Path(tempfile.mkdtemp(prefix="bd-", dir="/tmp"))  # short: socket paths <108 bytes
    proc, host = own_dockerd(root)
    engine = Docker(host)
    deadline = time.monotonic() + 60
    while not engine.answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            log = (root / "dockerd.log").read_text(errors="replace")[-1500:]
            stop_dockerd(proc, root)
            pytest.skip(f"dockerd --bridge=none --iptables=false did not start here:\n{log}")
        time.sleep(0.5)
    try:
        yield engine
    finally:
        stop_dockerd(proc, root)


@pytest.fixture(scope="session")
def base_image(docker: Docker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    named = os.environ.get("BATCHD_TEST_BASE_IMAGE")
    if named:
        if not docker.has_image(named):
            pytest.skip(f"BATCHD_TEST_BASE_IMAGE={named} is not an image of this engine")
        yield named
        return
    if docker.has_image(DEFAULT_BASE):
        yield DEFAULT_BASE
        return
    try:
        docker("pull", DEFAULT_BASE, timeout=300)
    except (RuntimeError, subprocess.TimeoutExpired):
        pass  # no registry here: the stand-in
    else:
        yield DEFAULT_BASE
        return
    tag = f"batchd-test-base:{uuid.uuid4().hex[:12]}"
    why = standin_base(docker, tmp_path_factory.mktemp("base"), tag)
    if why:
        pytest.skip(f"{DEFAULT_BASE} cannot be pulled here, and {why}")
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)


@pytest.fixture(scope="session")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the build context with a fresh wheelhouse: the build reaches no index."""
    ctx = tmp_path_factory.mktemp("context")
    junk = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in CONTEXT:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, ctx / name, ignore=junk)
        else:
            shutil.copy2(src, ctx / name)
    (ctx / "docker").mkdir()
    shutil.copy2(ROOT / "docker" / "Dockerfile", ctx / "docker" / "Dockerfile")
    wheels = ctx / "docker" / "wheelhouse"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", ".[server]", "hatchling>=1.21",
         "-w", str(wheels)],
        cwd=ctx, capture_output=True, timeout=900, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace")[-1500:]
        pytest.skip(f"pip wheel could not build the wheelhouse (is the index reachable?):\n{err}")
    return ctx


@pytest.fixture(scope="session")
def image(docker: Docker, base_image: str, context: Path) -> Iterator[str]:
    """The batchd image, built offline from ``context``; removed at the end."""
    tag = f"batchd-test:{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    docker(
        "build", "--network", "host", "--build-arg", f"BASE_IMAGE={base_image}",
        "-f", str(context / "docker" / "Dockerfile"), "-t", tag, str(context), timeout=900,
    )  # fmt: skip
    size = int(docker("image", "inspect", "-f", "{{.Size}}", tag))
    took = time.monotonic() - started
    print(f"\nbuilt {tag} from {base_image} in {took:.0f} s: {size / 1e6:.0f} MB")  # pytest -s
    try:
        yield tag
    finally:
        docker("rmi", "-f", tag, check=False)
