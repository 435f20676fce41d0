"""PyTorch: the IterableDataset with DataLoader workers, ranks, set_epoch, pin_memory, training."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from batchd import Client
from stubserver import StubServer, serve_stub

torch = pytest.importorskip("torch")
from torch.utils.data import DataLoader  # noqa: E402


@pytest.fixture
def stub() -> Iterator[StubServer]:
    with serve_stub(count=48, classes=4) as s:
        yield s


def _ids(loader: object) -> list[int]:
    return [int(i) for b in loader for i in b["index"]]  # type: ignore[attr-defined]


def test_yields_dicts_of_tensors_without_copies(stub: StubServer) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    batch = next(iter(ds))
    assert set(batch) == {"image", "label", "index"}
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (8, 4, 4)
    assert torch.equal(batch["label"], batch["index"] % 4)
    assert len(ds) == 6


def test_two_workers_times_two_ranks_cover_the_epoch_once(stub: StubServer) -> None:
    per_rank = []
    for rank in range(2):
        ds = Client(stub.url, "toy", batch_size=4, rank=rank, world_size=2).torch()
        ids = _ids(DataLoader(ds, batch_size=None, num_workers=2))
        assert len(ids) == len(set(ids)) == 24
        # Workers interleave back into the rank's order: same as one process.
        ds.set_epoch(0)  # a second pass would otherwise be the next epoch
        assert ids == _ids(DataLoader(ds, batch_size=None, num_workers=0))
        per_rank.append(ids)
    assert sorted(per_rank[0] + per_rank[1]) == list(range(48))


def test_set_epoch_changes_the_order(stub: StubServer) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    first = _ids(DataLoader(ds, batch_size=None, num_workers=2))
    ds.set_epoch(1)
    second = _ids(DataLoader(ds, batch_size=None, num_workers=2))
    assert sorted(first) == sorted(second) == list(range(48)) and first != second
    with pytest.raises(ValueError, match="epoch"):
        ds.set_epoch(-1)


@pytest.mark.filterwarnings("ignore:.*pin_memory.*:UserWarning")
def test_pin_memory(stub: StubServer) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    ids = _ids(DataLoader(ds, batch_size=None, num_workers=1, pin_memory=True))
    assert sorted(ids) == list(range(48))


def test_rank_from_torch_distributed(stub: StubServer, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 3)
    ds = Client(stub.url, "toy", batch_size=4).torch()
    assert (ds.client.rank, ds.client.world_size) == (1, 3)
    given = Client(stub.url, "toy", batch_size=4, rank=0, world_size=2).torch()
    assert (given.client.rank, given.client.world_size) == (0, 2)  # explicit wins


def test_training_loop_learns() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 256)
    images = rng.integers(0, 60, (256, 8, 8), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = 250
    with serve_stub(arrays={"image": images, "label": labels.astype("<i8")}) as stub:
        ds = Client(stub.url, "toy", batch_size=32, seed=2).torch()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 4))
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        for epoch in range(3):
            ds.set_epoch(epoch)
            correct = 0
            for batch in DataLoader(ds, batch_size=None, num_workers=2):
                logits = model(batch["image"].float() / 255)
                loss = torch.nn.functional.cross_entropy(logits, batch["label"])
                opt.zero_grad()
                loss.backward()
                opt.step()
                correct += int((logits.argmax(1) == batch["label"]).sum())
        assert correct / 256 > 0.8  # chance is 0.25


# --- epochs across passes (issue 13) -------------------------------------------------------


def _pass_epochs(stub: StubServer, passes: list[list[int]]) -> list[int]:
    """Which epoch each pass served, by its order (every epoch's order is distinct)."""
    client = Client(stub.url, "toy", batch_size=8)
    orders = {tuple(_ids(client.iterate(e))): e for e in range(6)}
    assert len(orders) == 6
    return [orders.get(tuple(ids), -1) for ids in passes]


@pytest.mark.parametrize("persistent", [True, False])
def test_set_epoch_reaches_the_workers(stub: StubServer, persistent: bool) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    passes = []
    for epoch in (2, 0, 1):
        ds.set_epoch(epoch)
        passes.append(_ids(loader))
    assert _pass_epochs(stub, passes) == [2, 0, 1]


@pytest.mark.parametrize("persistent", [True, False])
def test_without_set_epoch_each_pass_is_the_next_epoch(stub: StubServer, persistent: bool) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=persistent)
    passes = [_ids(loader) for _ in range(3)]
    assert _pass_epochs(stub, passes) == [0, 1, 2]
    assert ds.epoch == 3  # the epoch the next pass serves
    ds.set_epoch(1)
    assert _pass_epochs(stub, [_ids(loader), _ids(loader)]) == [1, 2]


def test_passes_in_the_main_process_count_too(stub: StubServer) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    passes = [_ids(DataLoader(ds, batch_size=None)) for _ in range(2)]
    assert _pass_epochs(stub, passes) == [0, 1]


@pytest.mark.slow
def test_persistent_spawned_workers_follow_set_epoch(stub: StubServer) -> None:
    ds = Client(stub.url, "toy", batch_size=8).torch()
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="spawn",
    )
    passes = [_ids(loader)]
    ds.set_epoch(4)
    passes.append(_ids(loader))
    passes.append(_ids(loader))
    assert _pass_epochs(stub, passes) == [0, 4, 5]


def test_pickled_outside_a_worker_start_keeps_its_epoch(stub: StubServer) -> None:
    import pickle

    ds = Client(stub.url, "toy", batch_size=8).torch()
    ds.set_epoch(3)
    copy = pickle.loads(pickle.dumps(ds))
    assert copy.epoch == 3
    copy.set_epoch(5)  # its own shared memory: the original is not moved
    assert (ds.epoch, copy.epoch) == (3, 5)
