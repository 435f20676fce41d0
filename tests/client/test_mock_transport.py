"""Client logic without sockets: ordering, retries, failover, fingerprints, resume.

Every test answers the client with :class:`batchd.testing.MockTransport`, so what runs
is the client's own code above one HTTP exchange (tests/stubserver.py is kept for
what needs real sockets: cancellation, keep-alive, truncated bodies).
"""

from __future__ import annotations

import numpy as np
import pytest

from batchd import Client, FingerprintError, NotFoundError, UnavailableError
from batchd.testing import MockRequest, MockResponse, MockTransport
from batchd.wire import layout

COUNT, BATCH = 10, 4  # three batches: 4, 4, 2


class FakeServer:
    """Answers info and batch requests for one dataset; batch k of epoch e holds ids."""

    def __init__(self, fingerprint: str = "f1") -> None:
        self.fingerprint = fingerprint
        self.fail: list[MockResponse | Exception] = []  # answered first, in order

    def ids(self, epoch: int, k: int) -> np.ndarray:
        order = np.random.default_rng(epoch).permutation(COUNT)
        return order[k * BATCH : (k + 1) * BATCH]

    def __call__(self, req: MockRequest) -> MockResponse:
        if self.fail:
            nxt = self.fail.pop(0)
            if isinstance(nxt, Exception):
                raise nxt
            return nxt
        if req.path == "/v1/datasets/toy":
            return MockResponse.json(
                {
                    "name": "toy",
                    "count": COUNT,
                    "fingerprint": self.fingerprint,
                    "classes": None,
                    "fields": {"x": {"dtype": "<f4", "shape": [2]}},
                    "plan": {"num_batches": 3, "samples_per_rank": COUNT},
                }
            )
        prefix = "/v1/datasets/toy/batches/"
        if not req.path.startswith(prefix):
            return MockResponse.json({"error": "not_found", "detail": req.path}, 404)
        k, epoch = int(req.path.removeprefix(prefix)), int(req.query["epoch"])
        ids = self.ids(epoch, k)
        lay = layout(
            dataset="toy",
            fingerprint=self.fingerprint,
            epoch=epoch,
            batch=k,
            rows=len(ids),
            fields={"x": ("<f4", (2,))},
        )
        lay.index[:] = ids
        lay.fields["x"][:] = ids[:, None]
        return MockResponse(200, lay.body, {"Content-Type": "application/msgpack"})


def client(
    server: FakeServer, *, seed: int = 0, deadline: float = 2.0
) -> tuple[Client, MockTransport]:
    tx = MockTransport(server, ("http://a.test",), retry_deadline=deadline)
    return Client("http://a.test", "toy", batch_size=BATCH, seed=seed, transport=tx), tx


def test_an_epoch_is_every_batch_in_order_with_the_query_the_server_needs() -> None:
    server = FakeServer()
    c, tx = client(server, seed=7)
    got = list(c.iterate(2))
    assert [b["index"].tolist() for b in got] == [server.ids(2, k).tolist() for k in range(3)]
    assert np.array_equal(got[0]["x"][:, 0], got[0]["index"])
    batch_reqs = [r for r in tx.requests if "/batches/" in r.path]
    assert sorted(r.path for r in batch_reqs) == [f"/v1/datasets/toy/batches/{k}" for k in range(3)]
    assert {(r.query["seed"], r.query["epoch"], r.query["batch_size"]) for r in batch_reqs} == {
        ("7", "2", str(BATCH))
    }
    assert (c.epoch, c.next_batch) == (3, 0)


def test_503_and_network_errors_are_retried_until_an_answer() -> None:
    server = FakeServer()
    server.fail = [
        MockResponse.json({"error": "overloaded", "detail": "busy"}, 503, {"Retry-After": "0"}),
        ConnectionResetError("reset by peer"),
    ]
    c, tx = client(server)
    assert c.fetch(0, 1)["index"].tolist() == server.ids(0, 1).tolist()
    assert len(tx.requests) == 4  # 503, reset, info, batch


def test_a_failing_url_is_skipped_for_another() -> None:
    server = FakeServer()

    def handler(req: MockRequest) -> MockResponse:
        if req.url == "http://down.test":
            raise ConnectionRefusedError("refused")
        return server(req)

    tx = MockTransport(handler, ("http://down.test", "http://up.test"), retry_deadline=2.0)
    c = Client(["http://down.test", "http://up.test"], "toy", batch_size=BATCH, transport=tx)
    assert len(list(c.iterate(0))) == 3
    down = [r for r in tx.requests if r.url == "http://down.test"]
    assert len(down) == 1  # tried once, then cooled down while the other one answers


def test_unavailable_past_the_deadline_says_what_was_tried() -> None:
    server = FakeServer()
    server.fail = [MockResponse.json({"error": "overloaded", "detail": "busy"}, 503)] * 100
    c, _ = client(server, deadline=0.3)
    with pytest.raises(UnavailableError, match=r"retry_deadline\) against http://a\.test"):
        c.refresh()


def test_a_404_is_not_retried() -> None:
    server = FakeServer()
    server.fail = [MockResponse.json({"error": "unknown_dataset", "detail": "no toy"}, 404)]
    c, tx = client(server)
    with pytest.raises(NotFoundError, match="no toy"):
        c.refresh()
    assert len(tx.requests) == 1


def test_a_fingerprint_change_mid_epoch_is_an_error() -> None:
    server = FakeServer()
    c, _ = client(server)
    c.fetch(0, 0)  # the info (fingerprint f1) is read once and kept
    server.fingerprint = "f2"  # the pack was replaced on the server
    with pytest.raises(FingerprintError, match="f1 -> f2"):
        c.fetch(0, 1)


def test_state_dict_resumes_at_the_next_batch() -> None:
    server = FakeServer()
    c, _ = client(server)
    it = c.iterate(1)
    first = next(it)
    it.close()
    state = c.state_dict()
    again, tx = client(server)
    again.load_state_dict(state)
    rest = list(again.iterate())
    assert [b["index"].tolist() for b in [first, *rest]] == [
        server.ids(1, k).tolist() for k in range(3)
    ]
    assert not any(r.path.endswith("/batches/0") for r in tx.requests)


def test_seek_and_batches_are_the_adapters_api() -> None:
    server = FakeServer()
    c, _ = client(server)
    c.seek(5, 2)
    assert (c.epoch, c.next_batch) == (5, 2)
    assert [b["index"].tolist() for b in c.batches(4, [2, 0])] == [
        server.ids(4, 2).tolist(),
        server.ids(4, 0).tolist(),
    ]
    assert (c.epoch, c.next_batch) == (5, 2)  # batches() does not move the position
    with pytest.raises(ValueError, match="next_batch"):
        c.seek(0, -1)
    assert not c.shard_given and Client("http://a.test", "toy", rank=0).shard_given
