"""Splits against a real `batchd serve`: the rules of a split, through HTTP and the client."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from batchd import Client, RequestError
from serverproc import ServerProcess

AUG = [{"op": "random_crop", "size": 12}, {"op": "hflip"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    from batchd_server.pack import pack_arrays

    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    pack_arrays(
        data / "toy",
        {
            "image": rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8),
            "label": np.arange(40, dtype=np.int64),  # the sample id: rows can be checked
            "cls": np.arange(40, dtype=np.int64) // 10,  # packed class by class
        },
        progress=False,
    )
    with ServerProcess(data) as srv:
        yield srv


def _ids(batches: Iterator[dict[str, np.ndarray]]) -> list[int]:
    out: list[int] = []
    for b in batches:
        np.testing.assert_array_equal(b["label"], b["index"])  # index: the pack's ids
        out.extend(int(i) for i in b["index"])
    return out


def test_info_len_and_a_disjoint_covering_pair(server: ServerProcess) -> None:
    train = Client(server.url, "toy", batch_size=8, split="[:75%]", split_seed=1)
    val = Client(server.url, "toy", batch_size=8, split="[75%:]", split_seed=1, shuffle=False)
    assert (train.info.count, train.info.pack_count, train.info.split) == (30, 40, "[:75%]")
    assert (len(train), len(val)) == (4, 2)
    t, v = _ids(train.iterate(0)), _ids(val.iterate(0))
    assert len(set(t)) == 30 and v == sorted(v)  # shuffle=False: the split in id order
    assert sorted(t + v) == list(range(40))
    # Each epoch is a new permutation of the same split.
    again = _ids(train.iterate(1))
    assert sorted(again) == sorted(t) and again != t


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_inside_a_split_see_it_exactly_once(server: ServerProcess, drop_last: bool) -> None:
    split = "[:20%]+[40%:]"  # 32 samples
    whole = sorted(_ids(Client(server.url, "toy", batch_size=8, split=split).iterate(0)))
    per_rank = [
        _ids(
            Client(
                server.url,
                "toy",
                batch_size=4,
                split=split,
                rank=r,
                world_size=4,
                drop_last=drop_last,
            ).iterate(2)
        )
        for r in range(4)
    ]
    assert all(len(ids) == 8 for ids in per_rank)
    assert sorted(i for ids in per_rank for i in ids) == whole


def test_a_sample_gets_the_same_crop_in_a_split_as_in_the_pack(server: ServerProcess) -> None:
    def images(**kw: object) -> dict[int, np.ndarray]:
        client = Client(server.url, "toy", batch_size=7, seed=3, augment=AUG, **kw)  # type: ignore[arg-type]
        return {
            int(i): img.copy()
            for b in client.iterate(1)
            for i, img in zip(b["index"], b["image"], strict=True)
        }

    whole, part = images(), images(split="[50%:]", split_seed=4)
    assert len(part) == 20
    for sid, img in part.items():
        np.testing.assert_array_equal(img, whole[sid])


def test_stratify_by_an_integer_field(server: ServerProcess) -> None:
    half = Client(server.url, "toy", batch_size=8, split="[:50%]", stratify="cls", shuffle=False)
    ids = _ids(half.iterate(0))
    assert np.bincount(np.array(ids) // 10).tolist() == [5, 5, 5, 5]
    with pytest.raises(
        RequestError, match=r"cannot stratify by the field 'image'.*\['cls', 'label'\]"
    ):
        Client(server.url, "toy", batch_size=8, split="[:50%]", stratify="image").refresh()


def test_equal_splits_give_equal_bytes_and_other_splits_others(server: ServerProcess) -> None:
    with server.client() as http:

        def body(**q: object) -> bytes:
            r = http.get("/v1/datasets/toy/batches/0", params={"batch_size": 8, "seed": 1, **q})
            assert r.status_code == 200, r.text
            return r.content

        canonical = body(split="[:75%]")
        assert body(split=" [0%:75%] ") == canonical
        assert body(split="[:75%]", split_seed=0) == canonical
        assert body(split="[:75%]", split_seed=1) != canonical
        assert body() != canonical
        assert body(split="[:75%]", stratify="cls") != canonical


def test_resume_inside_a_split(server: ServerProcess) -> None:
    client = Client(server.url, "toy", batch_size=4, split="[:75%]")
    full = _ids(client.iterate(2))
    it = client.iterate(2)
    head = _ids(iter([next(it), next(it), next(it)]))
    it.close()
    resumed = Client(server.url, "toy", batch_size=4, split="[:75%]")
    resumed.load_state_dict(client.state_dict())
    assert head + _ids(resumed.iterate()) == full
    stream = resumed.stream()
    assert (
        _ids(iter([next(stream)]))
        == _ids(Client(server.url, "toy", batch_size=4, split="[:75%]").iterate(3))[:4]
    )
    stream.close()  # type: ignore[attr-defined]


def test_torch_workers_inside_a_split(server: ServerProcess) -> None:
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    client = Client(server.url, "toy", batch_size=4, split="[25%:]")
    ds = client.torch()
    loader = DataLoader(ds, batch_size=None, num_workers=2, persistent_workers=True)
    seen = [[int(i) for b in loader for i in b["index"]] for _ in range(2)]
    expect = [_ids(client.iterate(e)) for e in range(2)]  # pass e is epoch e
    assert seen == expect and sorted(seen[0]) == sorted(_ids(client.iterate(5)))
    assert all(torch.is_tensor(b["image"]) for b in [next(iter(DataLoader(ds, batch_size=None)))])


@pytest.mark.slow
def test_keras_fit_with_a_train_split_and_a_validation_split(server: ServerProcess) -> None:
    keras = pytest.importorskip("keras")
    train, val = ("[:75%]", "[75%:]")
    tr = Client(server.url, "toy", batch_size=8, split=train, augment=AUG).keras(x="image", y="cls")
    va = Client(
        server.url,
        "toy",
        batch_size=8,
        split=val,
        shuffle=False,
        augment=[{"op": "center_crop", "size": 12}],
    ).keras(x="image", y="cls")
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    history = model.fit(tr, validation_data=va, epochs=2, verbose=0)
    assert len(history.history["val_accuracy"]) == 2
    assert (tr.epoch, len(tr), len(va)) == (2, 4, 2)
