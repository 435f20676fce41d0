"""The ``docker`` CLI, a daemon of the tests' own, a stand-in base image (tests/container).

See conftest.py for how the session gets an engine, a base and the image.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

DEBIAN_MIRROR = os.environ.get("BATCHD_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")


class Docker:
    """The ``docker`` CLI against one engine (``DOCKER_HOST``), output as text."""

    def __init__(self, host: str | None) -> None:
        self.env = {**os.environ, "DOCKER_HOST": host} if host else dict(os.environ)

    def __call__(
        self, *args: str, timeout: float = 120, check: bool = True, stdin: bytes | None = None
    ) -> str:
        done = subprocess.run(
            ["docker", *args], input=stdin, capture_output=True, timeout=timeout,
            check=False, env=self.env,
        )  # fmt: skip
        if check and done.returncode != 0:
            err = done.stderr.decode(errors="replace").strip()[-2000:]
            raise RuntimeError(f"docker {' '.join(args)[:300]}: {err}")
        return done.stdout.decode(errors="replace").strip()

    def answers(self) -> bool:
        try:
            self("info", timeout=20)
        except (RuntimeError, subprocess.TimeoutExpired):
            return False
        return True

    def logs(self, container: str) -> str:
        """The container's output, stdout and stderr interleaved (the server logs to stderr)."""
        done = subprocess.run(
            ["docker", "logs", container], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            timeout=30, check=False, env=self.env,
        )  # fmt: skip
        return done.stdout.decode(errors="replace")

    def has_image(self, ref: str) -> bool:
        return bool(self("images", "-q", ref, check=False))


def own_dockerd(root: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``dockerd`` without a bridge on a private socket under ``root``."""
    host = f"unix://{root / 'docker.sock'}"
    with open(root / "dockerd.log", "wb") as log:
        proc = subprocess.Popen(
            [
                "dockerd", "--bridge=none", "--iptables=false", f"--host={host}",
                f"--data-root={root / 'data'}", f"--exec-root={root / 'exec'}",
                f"--pidfile={root / 'dockerd.pid'}",
            ],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    return proc, host


def stop_dockerd(proc: subprocess.Popen[bytes], root: Path) -> None:
    """SIGTERM the daemon (it stops its containerd), then remove everything under ``root``."""
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    for pid in os.listdir("/proc"):  # a containerd or shim it left behind, by its root
        with contextlib.suppress(OSError):
            if pid.isdigit() and str(root) in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(int(pid), signal.SIGKILL)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(root))), reverse=True):
        subprocess.run(["umount", "-l", mount], check=False, capture_output=True)
    shutil.rmtree(root, ignore_errors=True)


def standin_base(docker: Docker, work: Path, tag: str) -> str | None:
    """A base with python3 and pip on PATH from Debian packages; None (and why) if not."""
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        return "debootstrap (as root) is needed to build a stand-in base"
    rootfs = work / "rootfs"
    done = subprocess.run(
        ["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
         "bookworm", str(rootfs), DEBIAN_MIRROR],
        capture_output=True, timeout=1200, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        out = (done.stdout + done.stderr).decode(errors="replace")[-1500:]
        return f"debootstrap from {DEBIAN_MIRROR} failed (BATCHD_TEST_DEBIAN_MIRROR):\n{out}"
    tar = subprocess.run(["tar", "-C", str(rootfs), "-c", "."], capture_output=True, check=True)
    shutil.rmtree(rootfs, ignore_errors=True)
    debian = f"{tag}-debian"
    docker("import", "-", debian, stdin=tar.stdout, timeout=600)
    dockerfile = f"FROM {debian}\nRUN python3 -m venv /opt/py\nENV PATH=/opt/py/bin:$PATH\n"
    docker("build", "--network", "host", "-t", tag, "-", stdin=dockerfile.encode(), timeout=600)
    docker("rmi", debian, check=False)  # the stand-in keeps its layers
    return None


def healthy(url: str) -> bool:
    """Does ``url`` answer /healthz with 200 right now?"""
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=1) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def wait_healthy(url: str, timeout: float, logs: Callable[[], str]) -> None:
    """Wait until ``url`` answers /healthz; fail with ``logs()`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not healthy(url):
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} never answered /healthz; log:\n{logs()[-3000:]}")
        time.sleep(0.2)
