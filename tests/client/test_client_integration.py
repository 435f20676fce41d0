"""The client against a real `batchd serve` subprocess (tests/serverproc.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import batchd
from batchd import Client
from serverproc import ServerProcess, tiny_pack


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    data = tmp_path_factory.mktemp("data")
    tiny_pack(data / "toy", n=40)
    with ServerProcess(data) as srv:
        yield srv


def _ids(batches: Iterator[dict[str, np.ndarray]]) -> list[int]:
    out: list[int] = []
    for b in batches:
        np.testing.assert_array_equal(b["label"], b["index"])  # tiny_pack: label == id
        out.extend(int(i) for i in b["index"])
    return out


def test_datasets_and_info(server: ServerProcess) -> None:
    assert "toy" in batchd.datasets(server.url)
    client = Client(server.url, "toy", batch_size=8)
    assert (client.info.count, len(client)) == (40, 5)
    assert client.info.fields["image"].shape == (16, 16, 3)


@pytest.mark.parametrize(("drop_last", "batch_size"), [(False, 3), (True, 5)])
def test_epoch_exactly_once_per_rank_and_across_ranks(
    server: ServerProcess, drop_last: bool, batch_size: int
) -> None:
    per_rank = [
        _ids(
            Client(
                server.url, "toy", batch_size=batch_size, rank=r, world_size=4, drop_last=drop_last
            ).iterate(1)
        )
        for r in range(4)
    ]
    assert all(len(ids) == len(set(ids)) for ids in per_rank)
    everything = sorted(i for ids in per_rank for i in ids)
    assert everything == list(range(40))


def test_start_k_tail_equals_full_run_tail(server: ServerProcess) -> None:
    client = Client(server.url, "toy", batch_size=8, seed=5)
    full = [b["index"].tolist() for b in client.iterate(2)]
    assert [b["index"].tolist() for b in client.iterate(2, start=2)] == full[2:]


def test_state_dict_round_trip(server: ServerProcess) -> None:
    client = Client(server.url, "toy", batch_size=8, seed=5)
    full = _ids(client.iterate(3))
    it = client.iterate(3)
    head = _ids(iter([next(it), next(it), next(it)]))
    it.close()
    resumed = Client(server.url, "toy", batch_size=8, seed=5)
    resumed.load_state_dict(client.state_dict())
    assert head + _ids(resumed.iterate()) == full


def test_two_workers_times_two_ranks(server: ServerProcess) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    seen: list[int] = []
    for rank in range(2):
        ds = Client(server.url, "toy", batch_size=4, rank=rank, world_size=2).torch()
        for b in DataLoader(ds, batch_size=None, num_workers=2):
            assert torch.equal(b["label"], b["index"])
            seen.extend(b["index"].tolist())
    assert sorted(seen) == list(range(40))


def test_kill_and_restart_mid_epoch_finishes_exactly_once(tmp_path: Path) -> None:
    tiny_pack(tmp_path / "toy", n=40)
    with ServerProcess(tmp_path) as srv:
        client = Client(srv.url, "toy", batch_size=4, prefetch=2, retry_deadline=60)
        ids: list[int] = []
        restart: threading.Thread | None = None
        for k, batch in enumerate(client.iterate(0)):
            ids.extend(batch["index"].tolist())
            if k == 2:
                restart = threading.Thread(target=srv.restart)
                restart.start()
        assert restart is not None
        restart.join()
        assert sorted(ids) == list(range(40))


# --- the endless stream (issue 13) ---------------------------------------------------------


def _take(stream: Iterator[dict[str, np.ndarray]], n: int) -> list[list[int]]:
    out = [next(stream)["index"].tolist() for _ in range(n)]
    stream.close()  # type: ignore[attr-defined]
    return out


def test_stream_is_the_epochs_back_to_back(server: ServerProcess) -> None:
    client = Client(server.url, "toy", batch_size=16, seed=2, prefetch=3)  # 3 batches an epoch
    epochs = [[b["index"].tolist() for b in client.iterate(e)] for e in range(1, 4)]
    assert _take(client.stream(epoch=1, start=0), 9) == [b for e in epochs for b in e]
    assert (client.epoch, client.next_batch) == (4, 0)  # after the last batch of epoch 3
    assert _take(client.stream(epoch=2, start=1), 3) == epochs[1][1:] + epochs[2][:1]
    assert (client.epoch, client.next_batch) == (3, 1)


def test_stream_resumes_at_the_exact_next_batch(server: ServerProcess) -> None:
    client = Client(server.url, "toy", batch_size=16, seed=2)
    reference = _take(Client(server.url, "toy", batch_size=16, seed=2).stream(), 8)
    for cut in (2, 3, 4):  # mid-epoch, at an epoch's end, just after
        head = _take(client.stream(epoch=0, start=0), cut)
        resumed = Client(server.url, "toy", batch_size=16, seed=2)
        resumed.load_state_dict(client.state_dict())
        assert head + _take(resumed.stream(), 8 - cut) == reference, cut
