"""Faults on real ``batchd serve`` processes.

SIGKILL, SIGTERM, failover, dead clients, packs changed under the server.

Correctness is asserted (0 lost, 0 duplicated, byte-identical to an uninterrupted
reference run, typed errors only, the server alive); times and counts are recorded
in ``figures`` for docs/reliability.md.
"""

from __future__ import annotations

import http.client
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import pytest
from _common import Figures, RetryCounter, digest, env_int, reference, summary, tiny_images
from numpy.typing import NDArray

from batchd import Client, _transport
from batchd.wire import decode_batch
from batchd_server.augment import Pipeline
from batchd_server.format import open_dataset
from batchd_server.serve.request import BatchRequest
from batchd_server.shuffle import EpochPlan, permutation
from serverproc import ServerProcess, tiny_pack

pytestmark = pytest.mark.reliability

WIDE_N, WIDE_HW = 48, 256  # one 9.4 MB batch: more than loopback socket buffers hold
_CROP = '[{"op":"random_crop","size":40},{"op":"hflip"}]'  # read through the mapping


def _kill_now(srv: ServerProcess) -> None:
    assert srv.proc is not None
    srv.proc.send_signal(signal.SIGKILL)
    srv.proc.wait()


class _SlowBigBodies:
    """Reads bodies over 1 MB in 256 KB steps with a pause, so a kill lands mid-body.

    ``inside`` is set once such a body is partly read; ``cut`` counts bodies that ended
    early (the server died while sending), which the transport must retry.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.inside = threading.Event()
        self.cut = 0
        self._lock = threading.Lock()
        original = _transport._read_body

        def read(resp: http.client.HTTPResponse, buffers: Any) -> Any:
            length = resp.length
            if length is None or length < 1 << 20:
                return original(resp, buffers)
            buf = buffers.take(length)
            view = buf.data
            pos = 0
            try:
                while pos < length:
                    n = resp.readinto(view[pos : min(length, pos + (256 << 10))])
                    if not n:
                        raise http.client.IncompleteRead(b"", length - pos)
                    pos += n
                    self.inside.set()
                    time.sleep(0.004)
            except (OSError, http.client.HTTPException):
                with self._lock:
                    self.cut += 1
                raise
            return buf

        monkeypatch.setattr(_transport, "_read_body", read)


@pytest.mark.timeout(300)
def test_sigkill_during_epochs_loses_nothing(
    tmp_path: Path, figures: Figures, monkeypatch: pytest.MonkeyPatch
) -> None:
    """>= 20 SIGKILLs (every third one mid-body) while 3 clients run epochs; restart at once."""
    kills_wanted = env_int("BATCHD_KILLS", 20)
    data = tmp_path / "data"
    data.mkdir()
    n = 120
    tiny_pack(data / "kill", n=n, hw=16)
    tiny_pack(data / "wide", n=WIDE_N, hw=WIDE_HW, seed=1)
    retries = RetryCounter(monkeypatch)
    slow = _SlowBigBodies(monkeypatch)
    # --no-shm: the kills must be able to land while a body crosses the socket, which
    # is how every client off this host gets its batches.
    args = ["--threads", "1", "--cache-bytes", "64MiB", "--no-shm"]
    srv = ServerProcess(data, args=args).start()

    stop = threading.Event()
    errors: list[BaseException] = []
    lock = threading.Lock()
    last_done = [0.0]
    got: dict[tuple[str, int, int], list[tuple[int, str, NDArray[Any]]]] = {}
    transports: dict[str, object] = {}

    def trainer(name: str, dataset: str, batch_size: int, rank: int, world: int) -> None:
        try:
            client = Client(
                srv.url,
                dataset,
                batch_size=batch_size,
                rank=rank,
                world_size=world,
                prefetch=2,
                timeout=5,
                retry_deadline=90,
            )
            transports[name] = client._transport()
            epoch = 0
            while not stop.is_set() or epoch == 0:
                batches = []
                for k, batch in enumerate(client.iterate(epoch)):
                    batches.append((k, digest(batch), batch["index"].copy()))
                    with lock:
                        last_done[0] = time.monotonic()
                    time.sleep(0.005)  # a training step
                got[(dataset, rank, epoch)] = batches
                epoch += 1
            client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [
        threading.Thread(target=trainer, args=("rank0", "kill", 4, 0, 2)),
        threading.Thread(target=trainer, args=("rank1", "kill", 4, 1, 2)),
        threading.Thread(target=trainer, args=("wide", "wide", WIDE_N, 0, 1)),
    ]
    for t in threads:
        t.start()
    rng = random.Random(7)
    restart_s: list[float] = []
    recovery_s: list[float] = []
    mid_body_kills = 0
    try:
        while len(restart_s) < kills_wanted and not errors:
            if len(restart_s) % 3 == 2:
                slow.inside.clear()
                mid_body_kills += slow.inside.wait(10)
            else:
                time.sleep(rng.uniform(0.02, 0.5))
            t_kill = time.monotonic()
            _kill_now(srv)
            srv.start()
            t_up = time.monotonic()
            restart_s.append(t_up - t_kill)
            while not errors and time.monotonic() < t_up + 60:
                with lock:
                    if last_done[0] > t_up:
                        recovery_s.append(last_done[0] - t_kill)
                        break
                time.sleep(0.005)
    finally:
        stop.set()
        for t in threads:
            t.join(120)
        srv.stop()
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)
    assert len(restart_s) >= kills_wanted

    # Exactly once: every (epoch, rank) holds its planned ids, each once, in order.
    plan = {r: EpochPlan(count=n, batch_size=4, rank=r, world_size=2) for r in (0, 1)}
    checked = lost = duplicated = 0
    want_digests: dict[tuple[str, int, int, int], BatchRequest] = {}
    for (dataset, rank, epoch), batches in got.items():
        count = n if dataset == "kill" else WIDE_N
        p = plan[rank] if dataset == "kill" else EpochPlan(count=WIDE_N, batch_size=WIDE_N)
        want = Counter(
            np.concatenate(
                [p.batch_ids(permutation(count, 0, epoch), k) for k in range(p.num_batches)]
            ).tolist()
        )
        seen = Counter(np.concatenate([ids for _, _, ids in batches]).tolist())
        lost += sum((want - seen).values())
        duplicated += sum((seen - want).values())
        checked += sum(seen.values())
        assert [k for k, _, _ in batches] == list(range(p.num_batches))
        for k, _, _ in batches:
            want_digests[(dataset, rank, epoch, k)] = BatchRequest(
                dataset=dataset,
                k=k,
                batch_size=4 if dataset == "kill" else WIDE_N,
                epoch=epoch,
                rank=rank,
                world_size=2 if dataset == "kill" else 1,
            )
    for epoch in {e for (d, _, e) in got if d == "kill"}:
        if ("kill", 0, epoch) in got and ("kill", 1, epoch) in got:
            union = np.concatenate([ids for r in (0, 1) for _, _, ids in got[("kill", r, epoch)]])
            assert sorted(union.tolist()) == list(range(n))
    ref = reference(data, want_digests.values())
    mismatched = sum(
        d != ref[want_digests[(ds, r, e, k)]]
        for (ds, r, e), batches in got.items()
        for k, d, _ in batches
    )
    assert (lost, duplicated, mismatched) == (0, 0, 0)
    assert mid_body_kills >= 1 and slow.cut >= 1, "no kill landed inside a response body"
    figures.record(
        "sigkill",
        kills=len(restart_s),
        kills_mid_body=mid_body_kills,
        bodies_cut_short=slow.cut,
        epochs=len(got),
        batches_checked=len(want_digests),
        samples_checked=checked,
        lost=lost,
        duplicated=duplicated,
        bytes_mismatched=mismatched,
        restart_s=summary(restart_s),
        recovery_s=summary(recovery_s),
        retries_per_client={name: retries.retries(tx) for name, tx in transports.items()},
    )


def _wide_request(epoch: int) -> str:
    return (
        f"GET /v1/datasets/wide/batches/0?batch_size={WIDE_N}&epoch={epoch} HTTP/1.1\r\n"
        "Host: batchd\r\nConnection: close\r\n\r\n"
    )


def test_sigterm_finishes_in_flight_requests(tmp_path: Path, figures: Figures) -> None:
    """Requests sent before SIGTERM complete with the right bytes.

    The process exits within its grace period.
    """
    data = tmp_path / "data"
    data.mkdir()
    tiny_pack(data / "wide", n=WIDE_N, hw=WIDE_HW, seed=1)
    srv = ServerProcess(data, args=["--threads", "1"]).start()
    socks = []
    try:
        for epoch in range(4):
            s = socket.create_connection(("127.0.0.1", srv.port))
            s.sendall(_wide_request(epoch).encode())
            socks.append(s)
        first = http.client.HTTPResponse(socks[0])
        first.begin()
        head = first.read(64 << 10)  # the first body is streaming; the others wait or compute
        time.sleep(0.2)
        assert srv.proc is not None
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        bodies = [head + first.read()]
        for s in socks[1:]:
            resp = http.client.HTTPResponse(s)
            resp.begin()
            assert resp.status == 200
            bodies.append(resp.read())
        rc = srv.proc.wait(20)
        exit_s = time.monotonic() - t0
    finally:
        for s in socks:
            s.close()
        srv.stop()
    ref = reference(
        data, [BatchRequest(dataset="wide", k=0, batch_size=WIDE_N, epoch=e) for e in range(4)]
    )
    for epoch, body in enumerate(bodies):
        batch = decode_batch(np.frombuffer(body, np.uint8))
        assert (
            digest({**batch.fields, "index": batch.index})
            == ref[BatchRequest(dataset="wide", k=0, batch_size=WIDE_N, epoch=epoch)]
        )
    assert rc in (0, -signal.SIGTERM) and exit_s < 12, (rc, exit_s)
    figures.record("sigterm", in_flight=len(bodies), completed=len(bodies), exit_s=round(exit_s, 3))


def test_failover_when_one_replica_dies(
    tmp_path: Path, figures: Figures, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    n = 200
    tiny_pack(data / "toy", n=n, hw=16)
    retries = RetryCounter(monkeypatch)
    a, b = ServerProcess(data).start(), ServerProcess(data).start()
    try:
        client = Client(
            [a.url, b.url], "toy", batch_size=4, prefetch=2, timeout=5, retry_deadline=30
        )
        seen: list[tuple[int, str]] = []
        ids: list[int] = []
        t_kill = gap = 0.0
        for k, batch in enumerate(client.iterate(0)):
            seen.append((k, digest(batch)))
            ids.extend(batch["index"].tolist())
            if k == 10:
                _kill_now(a)
                t_kill = time.monotonic()
            elif k == 11:
                gap = time.monotonic() - t_kill
        tx = client._transport()
        client.close()
    finally:
        a.stop()
        b.stop()
    assert sorted(ids) == list(range(n))
    ref = reference(data, [BatchRequest(dataset="toy", k=k, batch_size=4) for k, _ in seen])
    assert all(d == ref[BatchRequest(dataset="toy", k=k, batch_size=4)] for k, d in seen)
    figures.record(
        "failover",
        replicas=2,
        killed=1,
        samples_checked=len(ids),
        lost=n - len(set(ids)),
        duplicated=len(ids) - len(set(ids)),
        failover_gap_s=round(gap, 4),
        retries=retries.retries(tx),
    )


_ABANDON = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(sys.argv[2].encode())
got = 0
while got < 65536:
    got += len(s.recv(65536))
print("reading", flush=True)
sys.stdin.read()
"""


def test_client_killed_mid_download_leaks_nothing(tmp_path: Path, figures: Figures) -> None:
    data = tmp_path / "data"
    data.mkdir()
    tiny_pack(data / "wide", n=WIDE_N, hw=WIDE_HW, seed=1)
    srv = ServerProcess(data, args=["--cache-bytes", "0", "--readahead", "0"]).start()
    try:
        assert srv.proc is not None
        proc = psutil.Process(srv.proc.pid)
        with srv.client() as c:
            for epoch in range(3):  # warm-up: imports, thread pool, allocator
                assert (
                    c.get(
                        "/v1/datasets/wide/batches/0", params={"batch_size": WIDE_N, "epoch": epoch}
                    ).status_code
                    == 200
                )
        fds0, rss0 = proc.num_fds(), proc.memory_info().rss
        killed = 0
        for epoch in range(10, 22):
            with subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _ABANDON, str(srv.port), _wide_request(epoch)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            ) as child:
                assert child.stdout is not None and child.stdout.readline() == b"reading\n"
                child.kill()  # SIGKILL mid-body: the kernel resets its connection
            killed += 1
        time.sleep(0.5)
        with srv.client() as c:
            r = c.get("/v1/datasets/wide/batches/0", params={"batch_size": WIDE_N, "epoch": 99})
            assert r.status_code == 200
        body = decode_batch(np.frombuffer(r.content, np.uint8))
        ref = reference(data, [BatchRequest(dataset="wide", k=0, batch_size=WIDE_N, epoch=99)])
        assert digest({**body.fields, "index": body.index}) == next(iter(ref.values()))
        fds1, rss1 = _settle(proc, fds0)
        assert srv.proc.poll() is None
    finally:
        srv.stop()
    body_mb = WIDE_N * WIDE_HW * WIDE_HW * 3 / 1e6
    # 12 abandoned 9.4 MB bodies held on to would be > 100 MB; allow allocator slack.
    assert fds1 <= fds0 + 2, (fds0, fds1)
    assert rss1 - rss0 < 60e6, (rss0, rss1)
    figures.record(
        "client_killed",
        clients_killed=killed,
        body_mb=round(body_mb, 1),
        fds_before=fds0,
        fds_after=fds1,
        rss_growth_mb=round((rss1 - rss0) / 1e6, 1),
    )


def _settle(proc: psutil.Process, fds0: int) -> tuple[int, int]:
    """fds and RSS once the server has closed what the dead clients left (up to 5 s)."""
    deadline = time.monotonic() + 5
    while proc.num_fds() > fds0 + 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    return proc.num_fds(), proc.memory_info().rss


def _hammer(
    srv: ServerProcess,
    stop: threading.Event,
    params: Callable[[int], dict[str, Any]],
    dataset: str,
    check: Callable[[httpx.Response], str],
    outcomes: Counter[str],
    errors: list[BaseException],
) -> None:
    try:
        with srv.client(timeout=30) as c:
            i = 0
            while not stop.is_set():
                i += 1
                r = c.get(f"/v1/datasets/{dataset}/batches/0", params=params(i))
                outcomes[check(r)] += 1
    except httpx.TimeoutException as exc:
        # A server that stops answering fails the test; say what its threads were doing.
        errors.append(RuntimeError(f"{exc!r} on {dataset}; server stacks:\n{srv.stacks()}"))
    except BaseException as exc:
        errors.append(exc)


def _load(
    srv: ServerProcess,
    stop: threading.Event,
    dataset: str,
    batch_size: int,
    check: Callable[[httpx.Response], str],
    outcomes: Counter[str],
    steady: Counter[str],
    errors: list[BaseException],
    augment: str | None = None,
) -> list[threading.Thread]:
    """Two threads hammering ``dataset`` and one reading the untouched "steady" dataset,
    which must answer 200 throughout (the other datasets keep serving)."""

    def check_steady(r: httpx.Response) -> str:
        assert r.status_code == 200, r.text
        return "200"

    def params(bs: int, aug: str | None) -> Callable[[int], dict[str, Any]]:
        extra = {} if aug is None else {"augment": aug}
        return lambda i: {"batch_size": bs, "seed": i, **extra}

    jobs = [(dataset, batch_size, augment, check, outcomes)] * 2
    jobs.append(("steady", 8, None, check_steady, steady))
    return [
        threading.Thread(
            target=_hammer, args=(srv, stop, params(bs, aug), name, ok, counts, errors)
        )
        for name, bs, aug, ok, counts in jobs
    ]


def _typed(r: httpx.Response, allowed: set[tuple[int, str]]) -> str:
    code = r.json().get("error")
    assert (r.status_code, code) in allowed, (r.status_code, r.text)
    return f"{r.status_code} {code}"


def test_pack_replaced_while_served(tmp_path: Path, figures: Figures) -> None:
    """Atomic repacks (new content) under load: each body is all old or all new, never mixed."""
    data, spare = tmp_path / "data", tmp_path / "spare"
    data.mkdir()
    spare.mkdir()
    n, hw = 64, 16
    tiny_pack(data / "swap", n=n, hw=hw, seed=0)
    tiny_pack(data / "steady", n=40)
    images = {}
    for seed in (0, 1):
        with open_dataset(tiny_pack(spare / f"s{seed}", n=n, hw=hw, seed=seed)) as ds:
            images[ds.fingerprint] = tiny_images(n, hw, seed)
    stop = threading.Event()
    errors: list[BaseException] = []
    swaps, steady = Counter[str](), Counter[str]()

    def check_swap(r: httpx.Response) -> str:
        if r.status_code != 200:
            return _typed(r, {(409, "dataset_changed"), (404, "dataset_unavailable")})
        b = decode_batch(np.frombuffer(r.content, np.uint8))
        assert b.fingerprint in images
        np.testing.assert_array_equal(b.fields["image"], images[b.fingerprint][b.index])
        np.testing.assert_array_equal(b.fields["label"], b.index)
        return f"200 {list(images).index(b.fingerprint)}"

    srv = ServerProcess(data, args=["--cache-bytes", "0", "--readahead", "0"]).start()
    threads = _load(srv, stop, "swap", 16, check_swap, swaps, steady, errors)
    replaced = 0
    try:
        for t in threads:
            t.start()
        for i in range(30):
            tiny_pack(data / "swap", n=n, hw=hw, seed=(i + 1) % 2, overwrite=True)
            replaced += 1
            time.sleep(0.03)
        time.sleep(0.2)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        alive = srv.proc is not None and srv.proc.poll() is None
        srv.stop()
    assert not errors, errors
    assert alive
    assert swaps["200 0"] and swaps["200 1"], swaps  # both versions were really served
    assert steady["200"] > 0
    figures.record(
        "pack_replaced",
        replacements=replaced,
        outcomes=dict(swaps),
        other_dataset_ok=steady["200"],
        mixed_bodies=0,
    )


@pytest.mark.parametrize("augment", [None, _CROP], ids=["gather", "crop"])
def test_pack_truncated_while_served(tmp_path: Path, figures: Figures, augment: str | None) -> None:
    """A data file truncated in place under load: typed errors or a clean re-open, never SIGBUS.

    Both paths read through the memory map under a read lease (batchd_server.format.lease), so
    each truncation first makes the server give the lease up and read with preadv until
    the pack is re-opened.
    """
    data = tmp_path / "data"
    data.mkdir()
    n, hw = 3000, 48  # 20 MB: a 512-sample gather takes long enough to be hit mid-read
    tiny_pack(data / "big", n=n, hw=hw)
    tiny_pack(data / "steady", n=40)
    images = tiny_images(n, hw, 0)
    with open_dataset(data / "big") as ds:
        fields = ds.fields
    raw = data / "big" / "image.raw"
    content = raw.read_bytes()
    cut = len(content) // 3
    stop = threading.Event()
    errors: list[BaseException] = []
    big, steady = Counter[str](), Counter[str]()

    def check_big(r: httpx.Response) -> str:
        if r.status_code != 200:
            return _typed(r, {(409, "dataset_changed"), (404, "dataset_unavailable")})
        b = decode_batch(np.frombuffer(r.content, np.uint8))
        want = images[b.index]
        if augment is not None:  # the same pipeline run in-process over the intact images
            out = {name: np.empty_like(a) for name, a in b.fields.items()}
            seed = int(r.request.url.params["seed"])
            Pipeline.parse(augment).run(
                lambda k: {"image": images[b.index[k]], "label": b.index[k]},
                b.index,
                seed,
                0,
                out,
                range(len(b.index)),
                fields=fields,
            )
            want = out["image"]
        np.testing.assert_array_equal(b.fields["image"], want)
        np.testing.assert_array_equal(b.fields["label"], b.index)
        return "200"

    srv = ServerProcess(data, args=["--cache-bytes", "0", "--readahead", "0"]).start()
    threads = _load(srv, stop, "big", 512, check_big, big, steady, errors, augment)
    truncations = 0
    try:
        for t in threads:
            t.start()
        t_end = time.monotonic() + 8
        while time.monotonic() < t_end and not errors:
            with open(raw, "r+b") as f:
                f.truncate(cut)
                time.sleep(0.002)
                f.seek(cut)
                f.write(content[cut:])
            truncations += 1
            time.sleep(0.005)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        rc = srv.proc.poll() if srv.proc is not None else None
        srv.stop()
    assert rc is None, f"the server died (exit {rc}; -7 is SIGBUS)"
    assert not errors, errors
    assert big["200"] > 0 and steady["200"] > 0
    figures.record(
        "pack_truncated" if augment is None else "pack_truncated_mapped",
        truncations=truncations,
        outcomes=dict(big),
        other_dataset_ok=steady["200"],
        server_deaths=0,
    )
