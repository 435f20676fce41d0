"""Shared-memory batch bodies (server/batchd_server/shm.py, the client's shm path).

Unit: the arena's files (modes, sizes, contents, scratch reuse, unlink when the body and
its views die or the cache evicts it, fallback when shared memory is full),
``layout(alloc=...)``, and the
client's refusal of anything but a regular file under /dev/shm owned by the server.
Integration: a real ``batchd serve --uds`` answers ``X-Batchd-Shm: 1`` with a path, the
file holds the very bytes of the msgpack body, an epoch over shared memory is exactly
once and byte-identical to a TCP server's, a body evicted before the client maps it
falls back to the bytes, ``--no-shm`` and TCP never answer shm, and SIGTERM removes
the directory.
"""

from __future__ import annotations

import errno
import gc
import json
import mmap
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from numpy.typing import NDArray

import batchd
import batchd._transport as transport
from batchd import WireError
from batchd.wire import decode_batch, layout
from batchd_server.cli import cli
from batchd_server.serve.cache import ByteLRU
from batchd_server.serve.shm import SHM_ROOT, ShmArena
from serverproc import ServerProcess, tiny_pack

pytestmark = pytest.mark.skipif(not SHM_ROOT.is_dir(), reason="needs /dev/shm")

AUGMENT: list[dict[str, Any]] = [{"op": "random_crop", "size": [12, 12]}, {"op": "hflip", "p": 0.5}]
N = 40


@pytest.fixture
def arena() -> Iterator[ShmArena]:
    a = ShmArena(min_bytes=0)  # the unit tests seal bodies of a few bytes
    yield a
    a.close()


def _files(a: ShmArena | Path) -> list[str]:
    """The body files (``b-<n>``; the directory also holds its ``.alive`` lock)."""
    d = a.dir if isinstance(a, ShmArena) else a
    return sorted(f for f in os.listdir(d) if f.startswith("b-"))


# --- the arena ---------------------------------------------------------------------------


def _counts(a: ShmArena) -> tuple[int, int, int]:
    st = a.stats()
    return st["files"], st["free"], st["lent"]


def _sealed(a: ShmArena, n: int, fill: int = 0) -> NDArray[np.uint8]:
    scratch = a.allocate(n)
    scratch[:] = fill
    return a.seal(scratch)


def test_seal_is_a_shared_file_of_exactly_the_body(arena: ShmArena) -> None:
    assert stat.S_IMODE(arena.dir.stat().st_mode) == 0o700
    assert arena.dir.parent == SHM_ROOT and arena.dir.name.startswith(f"batchd-{os.getpid()}-")
    scratch = arena.allocate(1000)
    assert scratch.shape == (1000,) and scratch.dtype == np.uint8 and scratch.flags.writeable
    scratch[:] = np.arange(1000) % 251
    want = scratch.tobytes()
    assert arena.path_of(scratch) is None and _files(arena) == []
    body = arena.seal(scratch)
    assert body.tobytes() == want and not body.flags.writeable  # never rewritten
    path = arena.path_of(body)
    assert path is not None and Path(path).parent == arena.dir
    st = os.stat(path)
    assert st.st_size == 1000 and stat.S_IMODE(st.st_mode) == 0o600
    assert Path(path).read_bytes() == want
    # The scratch buffer is recycled for the next body of that size, not the body.
    again = arena.allocate(1000)
    assert again.ctypes.data == scratch.ctypes.data
    again[:] = 0
    assert body.tobytes() == want


def test_a_lent_file_is_unlinked_when_the_body_and_its_views_die(arena: ShmArena) -> None:
    body = _sealed(arena, 4096)
    lent = arena.lend(body)
    assert lent is not None and lent[0] == arena.path_of(body)
    path = lent[0]
    view = body[100:200].view(np.uint16)  # e.g. a decoded field
    del body
    gc.collect()
    assert os.path.exists(path), "a live view must keep the body's file"
    del view
    # Lent and never given back (a client still maps it, or died): never rewritten.
    assert not os.path.exists(path)
    assert _files(arena) == [] and arena.stats()["files"] == arena.stats()["lent"] == 0


def test_a_file_given_back_is_recycled_under_a_new_name(arena: ShmArena) -> None:
    body = _sealed(arena, 4096, fill=1)
    path, token = arena.lend(body) or ("", "")
    assert arena.release([token]) == 1 and arena.release([token]) == 0  # counted once
    del body
    assert os.path.exists(path) and arena.stats()["free"] == 1  # kept, pages and all
    buf = arena.allocate(4096)
    buf[:] = 2  # gathered straight into the file
    again = arena.seal(buf)
    new = arena.path_of(again)
    assert new is not None and new != path and not os.path.exists(path)
    assert Path(new).read_bytes() == b"\x02" * 4096 and not again.flags.writeable
    assert arena.stats()["new"] == 1 and arena.stats()["recycled"] == 1
    assert arena.allocate(8192).size == 8192  # another size: not that file


def test_a_body_never_named_to_a_client_is_recycled(arena: ShmArena) -> None:
    body = _sealed(arena, 4096)
    del body
    assert _counts(arena) == (1, 1, 0)
    buf = arena.allocate(4096)
    del buf  # the gather failed: the file goes back, unsealed, never named
    assert arena.stats()["free"] == 1


def test_releases_count_only_tokens_this_arena_lent(arena: ShmArena) -> None:
    body = _sealed(arena, 4096)
    path, token = arena.lend(body) or ("", "")
    assert arena.release(["0" * 16, path, "", token + "0"]) == 0
    assert arena.stats()["lent"] == 1
    second = arena.lend(body)
    assert second is not None and second[1] != token  # one token per answer
    assert arena.release([token]) == 1
    del body
    assert not os.path.exists(path)  # the second client has not given it back


def test_at_most_idle_bytes_of_files_wait_for_recycling() -> None:
    a = ShmArena(min_bytes=0, idle_bytes=4096)
    try:
        bodies = [_sealed(a, 4096) for _ in range(3)]
        paths = [a.path_of(b) for b in bodies]
        while bodies:
            del bodies[0]  # the first to die takes the one free place
        assert [os.path.exists(str(p)) for p in paths] == [True, False, False]
        assert _counts(a) == (1, 1, 0)
    finally:
        a.close()


def test_cache_eviction_unlinks_the_evicted_lent_body_only(arena: ShmArena) -> None:
    cache: ByteLRU[int] = ByteLRU(capacity=2 * 4096)
    paths = []
    for k in range(3):
        body = _sealed(arena, 4096, k)
        paths.append(arena.path_of(body))
        arena.lend(body)
        cache.put(k, body)
    del body
    gc.collect()
    assert 0 not in cache and 1 in cache and 2 in cache
    assert [os.path.exists(str(p)) for p in paths] == [False, True, True]
    held = cache.get(1)  # a body being sent stays valid after eviction...
    cache.put(3, _sealed(arena, 4096))
    cache.put(4, _sealed(arena, 4096))
    assert 1 not in cache and os.path.exists(str(paths[1]))
    del held  # ...and its file goes with the last reference
    assert not os.path.exists(str(paths[1]))
    assert len(_files(arena)) == 2


def test_full_shared_memory_falls_back_to_private_memory(
    arena: ShmArena, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    scratch = arena.allocate(4096)
    scratch[:] = 5
    body = arena.seal(scratch)
    assert body is scratch and int(body.sum()) == 5 * 4096  # kept, not recycled
    assert arena.allocate(4096) is not scratch
    assert arena.path_of(body) is None
    assert _files(arena) == []  # the half-made file is gone
    assert "--shm-size" in caplog.text


def test_close_removes_the_directory_and_later_bodies_are_private() -> None:
    a = ShmArena()
    body = _sealed(a, 4096, 7)
    a.close()
    assert not a.dir.exists()
    assert int(body.sum()) == 7 * 4096  # the mapping outlives the file
    late = a.allocate(10)
    assert a.seal(late) is late and a.path_of(late) is None
    del body  # its finalizer finds the file gone already: no error


def test_layout_allocates_through_alloc(arena: ShmArena) -> None:
    spec: dict[str, tuple[Any, tuple[int, ...]]] = {"x": ("<f4", (3,)), "y": ("|u1", ())}
    kw: dict[str, Any] = dict(dataset="d", fingerprint="f", epoch=1, batch=2, rows=4, fields=spec)
    got: list[NDArray[np.uint8]] = []

    def alloc(n: int) -> NDArray[np.uint8]:
        got.append(arena.allocate(n))
        return got[-1]

    plain, shared = layout(**kw), layout(**kw, alloc=alloc)
    assert shared.body is got[0]
    for lay in (plain, shared):
        lay.index[:] = [5, 6, 7, 8]
        lay.fields["x"][:] = np.arange(12, dtype=np.float32).reshape(4, 3)
        lay.fields["y"][:] = 9
    body = arena.seal(shared.body)
    assert body.tobytes() == plain.body.tobytes()
    assert Path(str(arena.path_of(body))).read_bytes() == plain.body.tobytes()
    assert decode_batch(body).index.tolist() == [5, 6, 7, 8]
    with pytest.raises(ValueError, match="writable uint8 array"):
        layout(**kw, alloc=lambda n: np.empty(n - 1, dtype=np.uint8))


# --- the client's mapping ----------------------------------------------------------------


def test_client_maps_copy_on_write(arena: ShmArena) -> None:
    body = _sealed(arena, 8192, 3)
    path = arena.path_of(body)
    got = transport.map_shm_body({"path": path, "length": 8192}, "unix:///x", os.getuid())
    assert got.flags.writeable and int(got.sum()) == 3 * 8192
    got[:10] = 99  # the trainer's own page; the server's body is untouched
    assert int(body[:10].sum()) == 30
    assert isinstance(memoryview(got.base).obj, mmap.mmap)  # type: ignore[arg-type]


def test_client_falls_back_on_missing_or_resized_files(arena: ShmArena) -> None:
    body = _sealed(arena, 4096)
    path = arena.path_of(body)
    with pytest.raises(transport.ShmGone):
        transport.map_shm_body({"path": path, "length": 4095}, "u", os.getuid())
    with pytest.raises(transport.ShmGone):
        transport.map_shm_body({"path": f"{arena.dir}/nope", "length": 1}, "u", os.getuid())


@pytest.mark.parametrize(
    "payload",
    [
        {"path": "/etc/passwd", "length": 10},
        {"path": "/dev/shm/../../etc/passwd", "length": 10},
        {"path": "relative", "length": 10},
        {"path": "/dev/shm/x", "length": 0},
        {"path": "/dev/shm/x", "length": True},
        {"length": 10},
        ["not", "a", "map"],
    ],
)
def test_client_refuses_paths_outside_dev_shm(payload: Any) -> None:
    with pytest.raises(WireError, match=r"refusing|lacks|not a JSON object"):
        transport.map_shm_body(payload, "unix:///x", os.getuid())


def test_client_refuses_symlinks_directories_and_foreign_files(arena: ShmArena) -> None:
    body = _sealed(arena, 4096)
    path = str(arena.path_of(body))
    link = arena.dir / "link"
    link.symlink_to(path)
    sub = arena.dir / "sub"
    sub.mkdir()
    try:
        for bad in (str(link), str(sub)):
            with pytest.raises(WireError, match="refusing"):
                transport.map_shm_body({"path": bad, "length": 4096}, "u", os.getuid())
        with pytest.raises(WireError, match="owned by the server"):
            transport.map_shm_body({"path": path, "length": 4096}, "u", os.getuid() + 1)
    finally:
        link.unlink()
        sub.rmdir()


# --- a real server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="bd-shm-"))
    tiny_pack(root / "tiny", n=N)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sock() -> Iterator[Path]:
    # Short: a unix socket path must fit in 108 bytes, pytest's tmp_path may not.
    d = Path(tempfile.mkdtemp(prefix="bd-"))
    yield d / "s.sock"
    shutil.rmtree(d, ignore_errors=True)


def _dirs(pid: int) -> list[Path]:
    return sorted(SHM_ROOT.glob(f"batchd-{pid}-*"))


def _epoch(
    url: str, epoch: int = 3, batch_size: int = 16, **kw: Any
) -> list[dict[str, NDArray[Any]]]:
    with batchd.Client(url, "tiny", batch_size=batch_size, seed=5, augment=AUGMENT, **kw) as c:
        return [{k: v.copy() for k, v in b.items()} for b in c.iterate(epoch)]


def _mapped(a: NDArray[Any]) -> bool:
    base: Any = a
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)


#: The test bodies are a few KB: take them into shared memory despite the 1 MiB floor.
SHM = ["--shm-min-bytes", "0"]
QUERY = {"batch_size": "16", "seed": "5", "epoch": "3", "augment": json.dumps(AUGMENT)}


def test_shm_epoch_is_exactly_once_and_identical_to_the_bytes(data: Path, sock: Path) -> None:
    with (
        ServerProcess(data, uds=sock, args=SHM) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
    ):
        assert srv.proc is not None
        with srv.client() as http, tcp.client() as tcp_http:
            url = "/v1/datasets/tiny/batches/1"
            shm = http.get(url, params=QUERY, headers={"X-Batchd-Shm": "1"})
            plain = http.get(url, params=QUERY)
            no_shm = tcp_http.get(url, params=QUERY, headers={"X-Batchd-Shm": "1"})
        assert shm.status_code == 200
        assert shm.headers["content-type"] == transport.SHM_MEDIA
        ref = shm.json()
        assert set(ref) == {"path", "length", "fingerprint", "release"}
        assert Path(ref["path"]).parent in _dirs(srv.proc.pid)
        assert ref["fingerprint"] == shm.headers["x-batchd-fingerprint"]
        assert plain.headers["content-type"] == "application/msgpack"
        assert no_shm.headers["content-type"] == "application/msgpack"  # --no-shm: the bytes
        # Byte for byte: the file the path names is the msgpack body, and the TCP one.
        assert Path(ref["path"]).read_bytes() == plain.content == no_shm.content
        assert ref["length"] == len(plain.content)

        with batchd.Client(f"unix://{sock}", "tiny", batch_size=16, seed=5, augment=AUGMENT) as c:
            first = next(iter(c.iterate(3)))
            assert _mapped(first["image"]), "the unix-socket client did not map the body"
            first["image"][:] = 0  # writable, copy-on-write: the server's body is unchanged
        assert Path(ref["path"]).read_bytes() == plain.content
        del first

        over_shm, over_http = _epoch(f"unix://{sock}"), _epoch(tcp.url)
    ids = np.concatenate([b["index"] for b in over_shm])
    assert sorted(ids.tolist()) == list(range(N))  # exactly once
    _same_batches(over_shm, over_http)


def _same_batches(got: list[dict[str, NDArray[Any]]], want: list[dict[str, NDArray[Any]]]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes()


def test_loopback_tcp_gets_shared_memory_too(data: Path) -> None:
    # The kernel never routes 127.0.0.0/8 off the host: a loopback bind is as local as a
    # unix socket, so it keeps bodies in /dev/shm by default and batchd clients map them.
    with ServerProcess(data, args=SHM) as srv, ServerProcess(data, args=["--no-shm"]) as plain:
        assert srv.proc is not None and _dirs(srv.proc.pid)
        with srv.client() as http:
            r = http.get("/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"})
            generic = http.get("/v1/datasets/tiny/batches/0", params=QUERY)
        assert r.headers["content-type"] == transport.SHM_MEDIA
        assert Path(r.json()["path"]).parent in _dirs(srv.proc.pid)
        assert generic.headers["content-type"] == "application/msgpack"  # curl, httpx: bytes
        assert Path(r.json()["path"]).read_bytes() == generic.content
        for url in (srv.url, srv.url.replace("127.0.0.1", "localhost")):
            with batchd.Client(url, "tiny", batch_size=16, seed=5, augment=AUGMENT) as c:
                assert _mapped(next(iter(c.iterate(3)))["image"]), url
        _same_batches(_epoch(srv.url), _epoch(plain.url))
        assert not _mapped(_epoch(plain.url)[0]["image"])


def test_a_server_whose_user_cannot_be_told_is_never_mapped(
    data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(transport, "peer_uid", lambda sock: None)
    with ServerProcess(data, args=SHM) as srv, ServerProcess(data, args=["--no-shm"]) as plain:
        got = _epoch(srv.url)
        assert not any(_mapped(b["image"]) for b in got)
        _same_batches(got, _epoch(plain.url))


def test_only_same_host_peers_get_a_path(data: Path, arena: ShmArena) -> None:
    # serve keeps bodies in /dev/shm only where every peer is local; the app checks the
    # peer anyway, so the same engine answers a remote address with the bytes.
    import asyncio

    import httpx

    from batchd_server.serve.app import create_app
    from batchd_server.serve.engine import Engine
    from batchd_server.serve.registry import Registry

    app = create_app(Engine(Registry(data), shm=arena))

    async def content_type(peer: tuple[str, int]) -> str:
        t = httpx.ASGITransport(app=app, client=peer)
        async with httpx.AsyncClient(transport=t, base_url="http://batchd") as http:
            r = await http.get(
                "/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"}
            )
        assert r.status_code == 200, r.text
        return str(r.headers["content-type"])

    async def both() -> tuple[str, str, str]:
        return (
            await content_type(("127.0.0.1", 5000)),
            await content_type(("::1", 5000)),
            await content_type(("10.1.2.3", 5000)),
        )

    try:
        local, local6, remote = asyncio.run(both())
    finally:
        app.state.engine.close()
    assert local == local6 == transport.SHM_MEDIA
    assert remote == "application/msgpack"


def test_evicted_body_falls_back_to_the_bytes(
    data: Path, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = transport.map_shm_body

    def evict_some(payload: Any, url: str, owner: int) -> NDArray[np.uint8]:
        calls.append(payload["path"])
        if len(calls) % 2 == 0:
            os.unlink(payload["path"])  # the server's cache dropped it before we opened it
        return real(payload, url, owner)

    monkeypatch.setattr(transport, "map_shm_body", evict_some)
    with (
        ServerProcess(data, uds=sock, args=SHM) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
    ):
        assert srv.proc is not None
        got, want = _epoch(f"unix://{sock}"), _epoch(tcp.url)
    assert len(calls) == len(got) == len(want)  # each batch: one shm try, some the bytes
    _same_batches(got, want)


def test_a_server_whose_shared_memory_is_not_visible_gets_asked_for_bytes(
    data: Path, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server in a container with its own /dev/shm: no announced file is ever there.
    # One wasted round trip, then bytes; not an error, and not two requests per batch.
    calls: list[str] = []
    real = transport.map_shm_body

    def unseen(payload: Any, url: str, owner: int) -> NDArray[np.uint8]:
        calls.append(payload["path"])
        return real({**payload, "path": payload["path"] + "-elsewhere"}, url, owner)

    monkeypatch.setattr(transport, "map_shm_body", unseen)
    with (
        ServerProcess(data, uds=sock, args=SHM) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
    ):
        assert srv.proc is not None
        # One request at a time, so the count is exact (with prefetch, each request sent
        # before the first answer came back makes its one try too).
        got, want = _epoch(f"unix://{sock}", prefetch=1), _epoch(tcp.url)
    assert len(got) > 1 and len(calls) == 1
    _same_batches(got, want)


def test_three_bodies_missing_in_a_row_turn_shared_memory_off(
    data: Path, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = transport.map_shm_body

    def lose_after_first(payload: Any, url: str, owner: int) -> NDArray[np.uint8]:
        calls.append(payload["path"])
        if len(calls) > 1:
            os.unlink(payload["path"])
        return real(payload, url, owner)

    monkeypatch.setattr(transport, "map_shm_body", lose_after_first)
    with (
        ServerProcess(data, uds=sock, args=SHM) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
    ):
        assert srv.proc is not None
        got = _epoch(f"unix://{sock}", prefetch=1, batch_size=4)
        want = _epoch(tcp.url, batch_size=4)
    assert len(got) > 4 and len(calls) == 4  # one mapped, three gone, then bytes only
    _same_batches(got, want)


def test_bodies_a_trainer_still_holds_are_never_rewritten(data: Path, sock: Path) -> None:
    # A cache of three bodies: each later epoch evicts and recycles the files of the one
    # before, while the trainer keeps every array of epoch 3 (views over the mappings).
    args = [*SHM, "--cache-bytes", str(3 * 16 * 12 * 12 * 3 + 3000), "--readahead", "1"]
    with (
        ServerProcess(data, uds=sock, args=args) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
        batchd.Client(f"unix://{sock}", "tiny", batch_size=16, seed=5, augment=AUGMENT) as c,
    ):
        held = list(c.iterate(3))
        assert all(_mapped(b["image"]) for b in held)
        kept = [{k: v.copy() for k, v in b.items()} for b in held]
        for epoch in range(4, 10):
            for _ in c.iterate(epoch):
                pass  # dropped at once: given back, and recycled
        with srv.client() as http:
            shm = http.get("/v1/status").json()["server"]["shm"]
        want = _epoch(tcp.url)
    assert shm["recycled"] > 0, shm  # or this checks nothing
    _same_batches(held, kept)  # not one byte of a held body changed
    _same_batches(held, want)


def test_a_trainer_that_never_gives_bodies_back_gets_fresh_files(
    data: Path, sock: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An old client (or curl) never sends X-Batchd-Shm-Release: nothing it was named
    # is ever rewritten; its files are unlinked when the cache lets go of them.
    monkeypatch.setattr(transport, "give_back_when_unmapped", lambda *a: None)
    args = [*SHM, "--cache-bytes", str(3 * 16 * 12 * 12 * 3 + 3000), "--readahead", "1"]
    with (
        ServerProcess(data, uds=sock, args=args) as srv,
        ServerProcess(data, args=["--no-shm"]) as tcp,
    ):
        got = [b for e in range(3, 7) for b in _epoch(f"unix://{sock}", epoch=e)]
        with srv.client() as http:
            shm = http.get("/v1/status").json()["server"]["shm"]
        want = [b for e in range(3, 7) for b in _epoch(tcp.url, epoch=e)]
    assert shm["recycled"] == 0 and shm["new"] >= len(got), shm
    _same_batches(got, want)


def test_uncached_bodies_are_sent_as_bytes(data: Path, sock: Path) -> None:
    # No cache and no read-ahead: a body's file would be gone before the client opened
    # it, so the answer is the bytes, once (not a path, then the bytes on a second try).
    args = [*SHM, "--cache-bytes", "0", "--readahead", "0"]
    with ServerProcess(data, uds=sock, args=args) as srv, srv.client() as http:
        r = http.get("/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"})
        assert r.headers["content-type"] == "application/msgpack"
        with ServerProcess(data, args=["--no-shm"]) as tcp:
            _same_batches(_epoch(f"unix://{sock}"), _epoch(tcp.url))


def test_small_bodies_stay_off_shared_memory(data: Path, sock: Path) -> None:
    with ServerProcess(data, uds=sock) as srv, srv.client() as http:  # the 1 MiB floor
        assert srv.proc is not None
        r = http.get("/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"})
        assert r.headers["content-type"] == "application/msgpack"
        assert _files(_dirs(srv.proc.pid)[0]) == []


def test_at_most_max_files_bodies_are_files(arena: ShmArena) -> None:
    # Each mapping holds a descriptor (Python's mmap dups it): the arena bounds them.
    arena.max_files = 3
    bodies = [_sealed(arena, 4096, fill=i) for i in range(5)]
    assert [arena.path_of(b) is not None for b in bodies] == [True] * 3 + [False] * 2
    assert [int(b[0]) for b in bodies] == [0, 1, 2, 3, 4]  # all five hold their bytes
    del bodies[0]
    gc.collect()
    assert arena.path_of(_sealed(arena, 4096)) is not None  # a file freed makes room


def test_no_shm_serves_the_bytes(data: Path, sock: Path) -> None:
    with ServerProcess(data, uds=sock, args=["--no-shm"]) as srv:
        assert srv.proc is not None
        assert _dirs(srv.proc.pid) == []
        with srv.client() as http:
            r = http.get("/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"})
        assert r.headers["content-type"] == "application/msgpack"
        assert len(decode_batch(r.content).index) == 16
        assert not _mapped(_epoch(f"unix://{sock}")[0]["image"])


def test_shm_that_other_hosts_could_reach_is_a_config_error(data: Path) -> None:
    args = ["serve", "--data", str(data), "--host", "0.0.0.0", "--token", "t", "--shm"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    message = str(result.exception) + result.output
    assert "--shm with --host 0.0.0.0" in message and "--uds" in message


def test_sigterm_removes_the_directory(data: Path, sock: Path) -> None:
    srv = ServerProcess(data, uds=sock, args=SHM).start()
    try:
        assert srv.proc is not None
        pid = srv.proc.pid
        (shm_dir,) = _dirs(pid)
        with srv.client() as http:
            r = http.get("/v1/datasets/tiny/batches/0", params=QUERY, headers={"X-Batchd-Shm": "1"})
        assert os.path.exists(r.json()["path"])
    finally:
        code = srv.stop()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises SIGTERM after its shutdown
    assert not shm_dir.exists()


def test_directories_of_dead_servers_are_removed_at_start(tmp_path: Path) -> None:
    alive = ShmArena(tmp_path)  # a live server: its lock is held
    try:
        dead = tmp_path / "batchd-999999-0badcafe"  # a server SIGKILLed: its lock went with it
        dead.mkdir()
        (dead / ".alive").touch()
        (dead / "b-0").write_bytes(b"x" * 100)
        unlocked = tmp_path / "batchd-999998-0badcafe"  # no lock file (yet): left alone
        unlocked.mkdir()
        other = tmp_path / "not-batchd"
        other.mkdir()
        second = ShmArena(tmp_path)
        try:
            assert not dead.exists()
            assert alive.dir.exists() and unlocked.exists() and other.exists()
        finally:
            second.close()
    finally:
        alive.close()
    assert not alive.dir.exists()


def test_sigkilled_server_directory_goes_when_the_next_one_starts(data: Path, sock: Path) -> None:
    first = ServerProcess(data, uds=sock, args=SHM).start()
    assert first.proc is not None
    (left,) = _dirs(first.proc.pid)
    first.proc.kill()
    first.proc.wait(10)
    assert left.exists()  # nothing ran to remove it
    sock.unlink()
    with ServerProcess(data, uds=sock, args=SHM):
        assert not left.exists()


def test_close_twice_leaves_other_descriptors_alone(tmp_path: Path) -> None:
    # serve closes the arena, and so does the engine: the second close must not close
    # whatever file took the lock's descriptor number in between.
    a = ShmArena(tmp_path)
    a.close()
    with open(tmp_path / "after", "wb") as f:
        a.close()
        f.write(b"still open")
    assert (tmp_path / "after").read_bytes() == b"still open"
