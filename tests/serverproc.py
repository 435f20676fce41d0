"""Run ``batchd serve`` as a real subprocess for integration tests.

::

    with ServerProcess(data_dir, token="t") as srv:
        r = srv.client().get("/v1/datasets")

The server binds a free loopback port (or a unix socket), :meth:`start` waits until
``/healthz`` answers, and :meth:`stop` sends SIGTERM, then SIGKILL after a grace
period. :meth:`restart` keeps the same port, so a client pointed at the old URL
reaches the new process. Server output goes to a log file whose tail is included in
any start-up failure.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import httpx

__all__ = ["ServerProcess", "batchd_top", "free_port", "tiny_pack"]

_START_TIMEOUT = 60.0  # a cold start imports fastapi, uvicorn, numpy and cv2
_STOP_TIMEOUT = 15.0  # uvicorn drains for up to 10 s on SIGTERM


def free_port() -> int:
    """A loopback port nobody listens on right now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """One ``batchd serve`` subprocess over ``data``; a context manager."""

    def __init__(
        self,
        data: str | Path,
        *,
        port: int | None = None,
        uds: str | Path | None = None,
        token: str | None = None,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.data = Path(data)
        self.uds = Path(uds) if uds is not None else None
        self.port = port if port is not None or uds is not None else free_port()
        self.token = token
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="batchd-serve-", suffix=".log")[1])

    @property
    def url(self) -> str:
        return "http://batchd" if self.uds is not None else f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-c",
            "from batchd_server.cli import main; main()",
            "serve",
            "--data",
            str(self.data),
            "--log-level",
            "warning",
        ]
        if self.uds is not None:
            cmd += ["--uds", str(self.uds)]
        else:
            cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        if self.token is not None:
            cmd += ["--token", self.token]
        return cmd + self.args

    def client(self, *, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An httpx client for this server (the server's token unless ``token`` is given)."""
        tok = token if token is not None else self.token
        headers = {"Authorization": f"Bearer {tok}"} if tok is not None else {}
        transport = httpx.HTTPTransport(uds=str(self.uds)) if self.uds is not None else None
        return httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout, transport=transport
        )

    def log(self) -> str:
        try:
            return self._log.read_text(errors="replace")
        except OSError:
            return ""

    def start(self) -> ServerProcess:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("server already running")
        env = {**os.environ, **(self.env or {})}
        with open(self._log, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        deadline = time.monotonic() + _START_TIMEOUT
        with self.client(timeout=2.0) as c:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"batchd serve exited with {self.proc.returncode} before it was healthy:\n"
                        + self.log()[-4000:]
                    )
                # httpx leaks the socket of a failed unix-socket connect: probe it ourselves.
                if self.uds is None or self._uds_listening():
                    try:
                        if c.get("/healthz").status_code == 200:
                            return self
                    except httpx.TransportError:
                        pass
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"batchd serve not healthy after {_START_TIMEOUT} s:\n{self.log()[-4000:]}"
        )

    def _uds_listening(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(self.uds))
            except OSError:
                return False
            return True

    def stacks(self, wait: float = 1.0) -> str:
        """Every server thread's stack (SIGUSR1, which ``batchd serve`` answers on stderr):
        what a server that stopped answering was doing. Empty if it is not running."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        before = len(self.log())
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(wait)
        return self.log()[before:]

    def stop(self) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        return proc.returncode

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)


def tiny_pack(
    out: str | Path, *, n: int = 40, hw: int = 16, seed: int = 0, overwrite: bool = False
) -> Path:
    """A small raw pack (uint8 ``image`` n x hw x hw x 3, int64 ``label``) at ``out``.

    Pixel values are random; ``label`` is the sample id, so a batch's labels must equal
    its ``index`` (a cheap check that rows were gathered from the right samples).
    """
    import numpy as np

    from batchd_server.pack import pack_arrays

    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, hw, hw, 3), dtype=np.uint8)
    pack_arrays(
        out,
        {"image": images, "label": np.arange(n, dtype=np.int64)},
        overwrite=overwrite,
        progress=False,
    )
    return Path(out)


def jpeg_pack(out: str | Path, *, n: int = 24, hw: int = 64, quality: int = 95) -> Path:
    """A small encoded pack: ``image`` as JPEGs of noise (about 2.5 bytes a pixel at
    q95, so 64x64 samples average over 4 KiB), ``label`` the sample id.
    """
    import cv2
    import numpy as np

    from batchd_server.format.header import FieldSpec
    from batchd_server.format.writer import DatasetWriter, Encoded

    image = FieldSpec(
        name="image", dtype=np.dtype("u1"), shape=None, role="image", encoding="image", channels=3
    )
    label = FieldSpec(
        name="label", dtype=np.dtype("<i8"), shape=(), role="value", encoding="raw", channels=None
    )
    rng = np.random.default_rng(0)
    with DatasetWriter(out, [image, label]) as w:
        for i in range(n):
            pixels = rng.integers(0, 256, (hw, hw, 3), dtype=np.uint8)
            ok, jpg = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
            assert ok
            w.append({"image": Encoded(jpg.tobytes(), hw, hw), "label": np.int64(i)})
        w.commit()
    return Path(out)


def batchd_top(url: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``batchd top --once --url URL`` as a user runs it: its output, as text."""
    cmd = [sys.executable, "-c", "from batchd_server.cli import main; main()", "top", "--once"]
    return subprocess.run(
        [*cmd, "--url", url], capture_output=True, text=True, timeout=60, check=check
    )
