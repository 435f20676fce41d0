"""Client: epochs exactly once, resume, fingerprints, cancellation, pickling, validation."""

from __future__ import annotations

import json
import pickle
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

import batchd
from batchd import AuthError, Client, FingerprintError, NotFoundError, StateError
from stubserver import StubServer, serve_stub


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with serve_stub(count=40, classes=4) as s:
        yield s


def _ids(batches: Iterator[dict[str, np.ndarray]]) -> list[int]:
    return [int(i) for b in batches for i in b["index"]]


def _fetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("batchd-fetch")]


def test_info_len_and_datasets(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8)
    info = client.info
    assert (info.count, info.fingerprint, info.batches) == (40, stub.fingerprint, 5)
    assert info.fields["image"].shape == (4, 4) and info.fields["label"].dtype == "<i8"
    assert info.classes == ("c0", "c1", "c2", "c3")
    assert len(client) == 5
    assert batchd.datasets(stub.url) == ["toy"]


def test_epoch_is_a_shuffled_permutation_with_aligned_fields(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8, seed=3)
    batches = list(client.iterate(0))
    ids = _ids(iter(batches))
    assert sorted(ids) == list(range(40)) and ids != list(range(40))
    for b in batches:
        assert set(b) == {"image", "label", "index"}
        np.testing.assert_array_equal(b["label"], b["index"] % 4)
        np.testing.assert_array_equal(b["image"][:, 0, 0], b["index"] % 251)
    assert _ids(client.iterate(0)) == ids  # pure function of (seed, epoch)
    assert _ids(client.iterate(1)) != ids


@pytest.mark.parametrize(("drop_last", "batch_size"), [(False, 6), (True, 5)])
def test_ranks_together_cover_the_epoch_once(
    stub: StubServer, drop_last: bool, batch_size: int
) -> None:
    per_rank = [
        _ids(
            Client(
                stub.url, "toy", batch_size=batch_size, rank=r, world_size=4, drop_last=drop_last
            ).iterate(2)
        )
        for r in range(4)
    ]
    assert all(len(set(ids)) == len(ids) == 10 for ids in per_rank)  # exactly once per rank
    assert sorted(i for ids in per_rank for i in ids) == list(range(40))  # and across ranks


def test_start_k_yields_the_tail_of_a_full_run(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8)
    full = [b["index"].tolist() for b in client.iterate(4)]
    tail = [b["index"].tolist() for b in client.iterate(4, start=3)]
    assert tail == full[3:]
    assert list(client.iterate(4, start=5)) == []
    with pytest.raises(ValueError, match="past the end"):
        next(client.iterate(4, start=6))


def test_state_dict_round_trip(stub: StubServer) -> None:
    kwargs = {"batch_size": 8, "seed": 9, "augment": [{"op": "hflip", "p": 0.5}]}
    client = Client(stub.url, "toy", **kwargs)  # type: ignore[arg-type]
    full = _ids(client.iterate(1))
    it = client.iterate(1)
    head = _ids(iter([next(it), next(it)]))
    it.close()
    state = json.loads(json.dumps(client.state_dict()))  # survives a JSON checkpoint
    assert (state["epoch"], state["next_batch"]) == (1, 2)

    resumed = Client(stub.url, "toy", **kwargs)  # type: ignore[arg-type]
    resumed.load_state_dict(state)
    assert head + _ids(resumed.iterate()) == full
    assert (resumed.epoch, resumed.next_batch) == (2, 0)  # the epoch ended: next one

    other = Client(stub.url, "toy", batch_size=16, seed=9)
    with pytest.raises(StateError, match=r"batch_size=8 \(this client: 16\).*augment"):
        other.load_state_dict(state)
    with pytest.raises(StateError, match="not a batchd client state"):
        other.load_state_dict({"epoch": 1})


def test_augment_travels_as_compact_json(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=40, augment=[{"p": 0.5, "op": "hflip"}])
    list(client.iterate(0))
    batch_q = next(q for p, q in stub.requests if "/batches/" in p)
    assert batch_q["augment"] == '[{"op":"hflip","p":0.5}]'
    assert batch_q["seed"] == "0" and batch_q["shuffle"] == "true"


def test_fingerprint_change_mid_epoch_is_an_error(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8, prefetch=1)
    it = client.iterate(0)
    next(it)
    stub.fingerprint = "0" * 16
    with pytest.raises(
        FingerprintError, match=r"'toy' changed on the server \(fingerprint f+ -> 0+\)"
    ):
        list(it)
    assert len(list(client.iterate(0))) == 5  # a new epoch starts from the new data


def test_resuming_a_changed_dataset_mid_epoch_is_an_error(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8)
    it = client.iterate(0)
    next(it)
    it.close()
    state = client.state_dict()
    stub.fingerprint = "1" * 16
    resumed = Client(stub.url, "toy", batch_size=8)
    resumed.load_state_dict(state)
    with pytest.raises(FingerprintError, match="since the state was saved"):
        next(resumed.iterate())


def test_closing_early_cancels_and_joins_the_fetchers(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=2, prefetch=4)
    stub.inject(*[("slow", 2.0)] * 6)
    it = client.iterate(0)
    next(it)  # the refill request for batch 4 is now in flight, slow
    assert _fetch_threads()
    t0 = time.monotonic()
    it.close()
    assert not _fetch_threads()
    assert time.monotonic() - t0 < 1.5  # cancelled, not waited out


def test_batches_are_writable_and_survive_later_batches(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8)
    batches = list(client.iterate(0))
    for b in batches:
        assert b["image"].flags.writeable
        np.testing.assert_array_equal(b["label"], b["index"] % 4)  # not overwritten
    batches[0]["image"][:] = 0


def test_kill_and_restart_mid_epoch_finishes_exactly_once() -> None:
    stub = StubServer(count=40).start()
    try:
        client = Client(stub.url, "toy", batch_size=4, prefetch=2, retry_deadline=20)
        ids: list[int] = []
        for k, batch in enumerate(client.iterate(0)):
            ids.extend(batch["index"].tolist())
            if k == 3:
                stub.stop()
                threading.Timer(1.0, stub.start).start()
        assert sorted(ids) == list(range(40))
    finally:
        time.sleep(1.1)
        stub.stop()


def test_client_pickles_without_sockets(stub: StubServer) -> None:
    client = Client(stub.url, "toy", batch_size=8)
    first = _ids(client.iterate(0))
    clone = pickle.loads(pickle.dumps(client))
    assert _ids(clone.iterate(0)) == first
    clone.close()
    client.close()


def test_token_from_argument_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with serve_stub(token="t0k") as stub:
        with pytest.raises(AuthError, match="401"):
            len(Client(stub.url, "toy"))
        assert len(Client(stub.url, "toy", token="t0k")) == 1
        monkeypatch.setenv("BATCHD_TOKEN", "t0k")
        assert len(Client(stub.url, "toy")) == 1


def test_unknown_dataset_names_the_served_ones(stub: StubServer) -> None:
    with pytest.raises(NotFoundError, match=r"served: \['toy'\]"):
        _ = Client(stub.url, "nope").info


def test_progress_bar(stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    assert len(list(Client(stub.url, "toy", batch_size=8).iterate(0, progress=True))) == 5
    assert "toy epoch 0" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"rank": 2, "world_size": 2}, r"rank must be in 0\.\.1"),
        ({"seed": -1}, "seed must be in"),
        ({"augment": [{"p": 1}]}, r"augment\[0\]"),
        ({"augment": [{"op": "x", "p": object()}]}, "plain JSON"),
        ({"prefetch": 0}, "prefetch must be >= 1"),
        ({"timeout": 0}, "timeout must be a positive"),
    ],
)
def test_bad_parameters_are_refused_at_construction(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Client("http://127.0.0.1:1", "toy", **kwargs)  # type: ignore[arg-type]


def test_bad_url_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="unix:///path"):
        Client(["http://127.0.0.1:1", "tcp://x"], "toy")
