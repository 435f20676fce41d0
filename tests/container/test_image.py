"""The real image on a real engine, run as compose runs it.

One container serves two packs read-only with host networking, on a free loopback port
(``BATCHD_PORT``, which the image's HEALTHCHECK reads too): ``tiny``, owned by the
image's uid 10001, and ``other``, owned by another uid. The tests run in file order:
the last one stops the container. The engine, base and image come from conftest.py.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from dockerengine import Docker, wait_healthy

from batchd import Client
from serverproc import free_port, tiny_pack

pytestmark = pytest.mark.timeout(1800)  # the first test pays for the base and the build

TOKEN = "container-test-token"
UID = 10001
OTHER_UID = 20002
N, HW, BATCH = 2048, 64, 128  # 1.5 MB bodies: over the 1 MiB shared-memory floor


@dataclass
class Served:
    docker: Docker
    cid: str
    url: str

    def logs(self) -> str:
        return self.docker.logs(self.cid)

    def get(self, path: str) -> Any:
        req = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if path.startswith("/v1/") else body.decode()

    def batches_served(self) -> float:
        for line in self.get("/metrics").splitlines():
            if line.startswith('batchd_batches_served_total{dataset="tiny"}'):
                return float(line.split()[-1])
        return 0.0

    def client(self, **kw: Any) -> Client:
        return Client(self.url, "tiny", batch_size=BATCH, seed=7, token=TOKEN, **kw)


@pytest.fixture(scope="module")
def served(
    docker: Docker, image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    data = tmp_path_factory.mktemp("data")
    tiny_pack(data / "tiny", n=N, hw=HW)
    tiny_pack(data / "other", n=100, hw=8)
    data.chmod(0o755)
    if os.geteuid() == 0:  # the lease needs the server's uid to own the files
        for pack, uid in ((data / "tiny", UID), (data / "other", OTHER_UID)):
            for path in [pack, *pack.iterdir()]:
                os.chown(path, uid, uid)
    port = free_port()
    # compose's command, on loopback and a free port (host networking: no bridge at all)
    cid = docker(
        "run", "-d", "--network", "host", "--read-only", "--tmpfs", "/tmp",
        "-e", f"BATCHD_TOKEN={TOKEN}", "-e", f"BATCHD_PORT={port}", "-v", f"{data}:/data:ro",
        image,
        "batchd", "serve", "--data", "/data", "--host", "127.0.0.1",
        "--demo-if-empty", "/tmp/batchd-demo",
    )  # fmt: skip
    served = Served(docker, cid, f"http://127.0.0.1:{port}")
    try:
        wait_healthy(served.url, 60, served.logs)
        yield served
    finally:
        docker("rm", "-f", cid, check=False)


def test_it_runs_as_uid_10001_on_a_read_only_root(served: Served, image: str) -> None:
    assert served.docker("image", "inspect", "-f", "{{.Config.User}}", image) == f"{UID}:{UID}"
    assert served.docker("exec", served.cid, "id", "-u") == str(UID)
    with pytest.raises(RuntimeError, match="Read-only file system"):
        served.docker("exec", served.cid, "touch", "/usr/probe")
    served.docker("exec", served.cid, "touch", "/tmp/probe")  # the tmpfs is writable
    tools = "command -v gcc cc make g++ || true"  # the runtime image holds no build tools
    assert served.docker("exec", served.cid, "sh", "-c", tools) == ""


def test_the_healthcheck_reaches_healthy(served: Served) -> None:
    deadline = time.monotonic() + 90  # the first check runs after --interval (10 s)
    status = ""
    while time.monotonic() < deadline:
        status = served.docker("inspect", "-f", "{{.State.Health.Status}}", served.cid)
        if status == "healthy":
            return
        time.sleep(1)
    health = served.docker("inspect", "-f", "{{json .State.Health}}", served.cid)
    raise AssertionError(f"health is {status!r} after 90 s: {health[-1500:]}")


def test_a_client_outside_the_container_reads_an_exact_epoch_as_bytes(served: Served) -> None:
    # The server sees a loopback peer and offers shared-memory bodies, but they live in the
    # container's own /dev/shm. The client must get bytes: no error, no second request for
    # every batch.
    before = served.batches_served()
    with served.client() as client:
        first = [{k: v.copy() for k, v in b.items()} for b in client.iterate(0)]
        served_once = served.batches_served() - before
        again = [{k: v.copy() for k, v in b.items()} for b in client.iterate(0)]
        prefetch = client.prefetch
    ids = np.concatenate([b["index"] for b in first])
    assert sorted(ids.tolist()) == list(range(N))  # every sample exactly once
    assert all((b["label"] == b["index"]).all() for b in first)
    assert len(first) == N // BATCH and len(again) == len(first)
    for a, b in zip(first, again, strict=True):  # the same request, the same bytes
        assert a["image"].tobytes() == b["image"].tobytes()
    shm = served.docker("exec", served.cid, "ls", "/dev/shm")
    assert "batchd-" in shm, "the server did not offer shared memory: this checks nothing"
    assert not any(Path("/dev/shm", d).exists() for d in shm.split()), "same /dev/shm?"
    # one shared-memory try per request sent before the first answer, then bytes only
    assert len(first) <= served_once <= len(first) + prefetch, served_once


def test_a_pack_of_another_uid_is_served_with_preadv_and_the_log_says_so(served: Served) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    reads = {d["name"]: d["reads"] for d in served.get("/v1/status")["datasets"]}
    assert reads["tiny"] == "mapped (read lease)"  # owned by the server's uid
    assert reads["other"].startswith("preadv ("), reads
    with Client(served.url, "other", batch_size=10, seed=1, token=TOKEN) as client:
        ids = np.concatenate([b["index"] for b in client.iterate(0)])
    assert sorted(ids.tolist()) == list(range(100))
    logs = served.logs()
    assert any("other" in line and "preadv" in line for line in logs.splitlines()), logs[-2000:]


def test_docker_restart_mid_epoch_loses_nothing(served: Served) -> None:
    with served.client() as client:
        want = [b["image"].copy() for b in client.iterate(1)]
    restarted: dict[str, float] = {}

    def restart() -> None:
        started = time.monotonic()
        served.docker("restart", "--time", "30", served.cid, timeout=90)
        restarted["took_s"], restarted["at"] = time.monotonic() - started, time.monotonic()

    thread = threading.Thread(target=restart)
    got, arrived = [], []
    with served.client() as client:
        for k, batch in enumerate(client.iterate(1)):
            got.append(batch["image"].copy())
            arrived.append(time.monotonic())
            if k == 2:
                thread.start()  # SIGTERM while later batches are in flight or not yet asked
            if k >= 2:
                time.sleep(0.25)  # a trainer's step: the rest of the epoch needs the server
    thread.join()
    assert len(got) == len(want)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(got, want, strict=True))
    assert arrived[-1] > restarted["at"], "the epoch ended before the restart: nothing tested"
    # SIGTERM drains and exits at once; ignored, docker would wait the full 30 s
    assert restarted["took_s"] < 15, f"docker restart took {restarted['took_s']:.1f} s"


def test_docker_stop_finishes_the_response_in_flight_and_exits_0(served: Served) -> None:
    # The whole pack as one 25 MB batch, read slowly: most of it is still to be sent when
    # SIGTERM arrives. It must arrive whole, and the server exit 0 well inside the grace.
    conn = http.client.HTTPConnection(served.url.removeprefix("http://"), timeout=30)
    query = urllib.parse.urlencode({"batch_size": N, "seed": 1, "epoch": 0})
    conn.request(
        "GET", f"/v1/datasets/tiny/batches/0?{query}", headers={"Authorization": f"Bearer {TOKEN}"}
    )
    resp = conn.getresponse()
    length = int(resp.headers["Content-Length"])
    got = len(resp.read(1 << 16))
    stop: dict[str, float] = {}

    def docker_stop() -> None:
        started = time.monotonic()
        served.docker("stop", "--time", "30", served.cid, timeout=60)
        stop["took_s"] = time.monotonic() - started

    thread = threading.Thread(target=docker_stop)
    thread.start()
    time.sleep(0.5)  # SIGTERM is in
    while chunk := resp.read(1 << 18):
        got += len(chunk)
        time.sleep(0.005)
    conn.close()
    thread.join()
    assert length > N * HW * HW * 3 and got == length, (got, length)
    assert stop["took_s"] < 10, f"SIGTERM took {stop['took_s']:.1f} s to drain and exit"
    code = served.docker("inspect", "-f", "{{.State.ExitCode}}", served.cid)
    assert code == "0", f"exit code {code}; log:\n{served.logs()[-2000:]}"
