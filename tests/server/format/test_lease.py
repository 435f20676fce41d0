"""Read leases: mapped reads while no one can shrink a pack, preadv otherwise.

Anything that reads a mapping which might be truncated runs in a child process, so a
SIGBUS (exit -7) fails the test instead of killing pytest. Nothing here installs the
SIGIO handler in the pytest process itself.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchd.wire import decode_batch
from batchd_server.format import lease
from serverproc import ServerProcess, tiny_pack

AUG = '[{"op":"random_crop","size":40},{"op":"hflip"}]'


def _child(script: str, *args: str, timeout: float = 60) -> dict[str, Any]:
    """Run ``script`` in a fresh interpreter; its last stdout line is a JSON result."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode} (-7 is SIGBUS):\n{done.stderr[-3000:]}"
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_release_waits_for_the_reads_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    fd = os.open(path, os.O_RDONLY)
    held = lease.Lease([fd], "f")  # no kernel lease: only the hold bookkeeping is tested
    inside, leave, released = threading.Event(), threading.Event(), threading.Event()

    def reader() -> None:
        with held.hold() as ok:
            assert ok
            inside.set()
            leave.wait(10)

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(10)
    r = threading.Thread(target=lambda: (held.release("test"), released.set()))
    r.start()
    assert not released.wait(0.3)  # a read is in progress: the release waits for it
    with held.hold() as ok:
        assert not ok  # but no new read may start on the mapping
    leave.set()
    assert released.wait(10)
    t.join()
    r.join()
    assert not held.held and held.why == "test"
    held.release("again")  # idempotent, and the first reason stays
    assert held.why == "test"


def test_no_lease_unless_the_process_handles_sigio(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # install() is per process and for good: a test that ran `batchd serve` in this
    # process (test_serve_cli.py, through CliRunner) has installed it. Pin the state of
    # a process that never did.
    monkeypatch.setattr(lease, "_wake", None)
    assert not lease.enabled()  # SIGIO's default action kills: never lease without install()
    path = tmp_path / "f"
    path.write_bytes(b"x")
    with open(path, "rb") as f:
        assert "leases are off" in str(lease.take([f.fileno()], "f"))


_TRUNCATE_UNDER_READS = """
    import json, os, subprocess, sys, threading, time
    import numpy as np
    from batchd_server.format import lease
    from batchd_server.errors import StaleError
    from batchd_server.format import open_dataset

    lease.install()
    ds = open_dataset(sys.argv[1])
    before = ds.reads
    images = ds.array("image")
    stop, mapped = threading.Event(), [0]

    def read():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            with ds.mapped() as ok:
                if ok:  # touches every page of 64 random samples
                    images[np.sort(rng.choice(len(images), 64, replace=False))].sum()
                    mapped[0] += 1

    threads = [threading.Thread(target=read) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    raw = os.path.join(sys.argv[1], "image.raw")
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", f"import os; os.truncate({raw!r}, 4096)"], check=True)
    took = time.monotonic() - t0
    time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    try:
        ds.read_row("image", len(images) - 1)
        stale = False
    except StaleError:
        stale = True
    print(json.dumps({
        "before": before, "after": ds.reads, "took": took, "mapped": mapped[0], "stale": stale
    }))
"""


def test_a_truncation_waits_until_mapped_reads_stop(tmp_path: Path) -> None:
    pack = tiny_pack(tmp_path / "ds", n=400, hw=64)
    got = _child(_TRUNCATE_UNDER_READS, str(pack))
    assert got["before"] == "mapped (read lease)"
    assert got["mapped"] > 0  # reads really went through the mapping until the break
    # The lease was given up at once, not revoked by the kernel after lease-break-time (45 s).
    assert got["took"] < 10
    assert got["after"] == "preadv (another process opened it for writing or truncated it)"
    assert got["stale"]  # and the truncation is now a StaleError, not a SIGBUS


_OPEN = """
    import json, sys
    from batchd_server.format import lease
    from batchd_server.format import open_dataset

    if sys.argv[2] == "install":
        lease.install()
    ds = open_dataset(sys.argv[1])
    with ds.mapped() as ok:
        print(json.dumps({"reads": ds.reads, "mapped": ok}))
"""


def test_a_writer_already_there_means_preadv(tmp_path: Path) -> None:
    pack = tiny_pack(tmp_path / "ds")
    with open(pack / "image.raw", "r+b"):
        got = _child(_OPEN, str(pack), "install")
    assert got == {
        "reads": "preadv (no read lease: a process has a file open for writing)",
        "mapped": False,
    }
    # Once the writer is gone the lease is granted; without install() it never is.
    assert _child(_OPEN, str(pack), "install") == {"reads": "mapped (read lease)", "mapped": True}
    assert _child(_OPEN, str(pack), "-")["reads"].startswith("preadv (leases are off")


def test_mapped_and_preadv_servers_send_the_same_bytes(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tiny_pack(data / "ds", n=300, hw=48)
    pipelines = [AUG, '[{"op":"hflip"}]', "[]"]  # the crop path, and the gather path
    bodies, reads = {}, {}
    for mode, args in (("mapped", []), ("preadv", ["--no-leases"])):
        with ServerProcess(data, args=args) as srv, srv.client() as c:
            reads[mode] = c.get("/v1/datasets").json()["datasets"][0]["reads"]
            bodies[mode] = [
                c.get(
                    f"/v1/datasets/ds/batches/{k}",
                    params={"batch_size": 64, "seed": 3, "epoch": e, "augment": aug},
                ).content
                for aug in pipelines
                for e in (0, 1)
                for k in range(5)
            ]
    assert reads["mapped"] == "mapped (read lease)"
    assert reads["preadv"].startswith("preadv (leases are off")
    assert bodies["mapped"] == bodies["preadv"]
    batch = decode_batch(np.frombuffer(bodies["mapped"][0], np.uint8))
    assert batch.fields["image"].shape == (64, 40, 40, 3)


def test_the_server_gives_a_lease_up_for_a_writer(tmp_path: Path) -> None:
    """``batchd serve`` answers a lease break: a writer waits milliseconds, not 45 s."""
    data = tmp_path / "data"
    data.mkdir()
    pack = tiny_pack(data / "ds", n=200, hw=48)
    with ServerProcess(data) as srv, srv.client() as c:

        def reads() -> str:
            return str(c.get("/v1/datasets").json()["datasets"][0]["reads"])

        assert reads() == "mapped (read lease)"
        t0 = time.monotonic()
        with open(pack / "image.raw", "r+b"):  # blocks until the server lets go
            took = time.monotonic() - t0
            # Batches go on meanwhile, read with preadv.
            r = c.get("/v1/datasets/ds/batches/0", params={"batch_size": 8, "augment": AUG})
            assert r.status_code == 200, r.text
        assert took < 10
        assert srv.proc is not None and srv.proc.poll() is None
        assert reads() in (
            "mapped (read lease)",  # re-opened after we closed the file
            "preadv (another process opened it for writing or truncated it)",
        )


def test_lease_refusals_say_what_to_do() -> None:
    said = lease._refusal
    assert (
        said(OSError(errno.EAGAIN, "x")) == "no read lease: a process has a file open for writing"
    )
    assert "run the server as their owner" in said(OSError(errno.EACCES, "x"))
    assert said(OSError(errno.ENOLCK, "No locks available")) == "no read lease: No locks available"
