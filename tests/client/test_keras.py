"""Keras: the PyDataset adapter trains a model, with workers, with a validation client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from batchd import Client
from stubserver import StubServer, serve_stub

keras = pytest.importorskip("keras")


def _squares(n: int, seed: int) -> dict[str, np.ndarray]:
    """Class k = a bright 4x4 square in quadrant k of a noisy 8x8 image."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, 8, 8), dtype=np.uint8)
    for i, k in enumerate(labels):
        r, c = divmod(int(k), 2)
        images[i, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] = 250
    return {"image": images, "label": labels.astype("<i8"), "weight": np.ones(n, "<f4")}


@pytest.fixture
def squares() -> Iterator[StubServer]:
    with serve_stub(arrays=_squares(256, 0)) as stub:
        yield stub


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((8, 8)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(4, activation="softmax"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.05),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    return model


def test_fit_learns_with_a_validation_client(squares: StubServer) -> None:
    train = Client(squares.url, "toy", batch_size=32, seed=1).keras(x="image", y="label")
    val = Client(squares.url, "toy", batch_size=64, shuffle=False).keras(x="image", y="label")
    assert len(train) == 8
    history = _model().fit(train, validation_data=val, epochs=4, shuffle=False, verbose=0)
    assert history.history["accuracy"][-1] > 0.8  # chance is 0.25
    assert history.history["val_accuracy"][-1] > 0.8
    assert train.epoch == 4 and train.client.state_dict()["epoch"] == 4


def test_fit_with_workers_fetches_each_batch_once(squares: StubServer) -> None:
    client = Client(squares.url, "toy", batch_size=32)
    seq = client.keras(x="image", y="label", sample_weight="weight", workers=2)
    _model().fit(seq, epochs=2, verbose=0)
    seen = [
        (int(q["epoch"]), int(p.rsplit("/", 1)[1])) for p, q in squares.requests if "/batches/" in p
    ]
    assert len(seen) == len(set(seen)), "a batch was fetched twice (the build peek keeps its one)"
    assert (
        sorted(k for e, k in seen if e == 0)
        == sorted(k for e, k in seen if e == 1)
        == list(range(8))
    )
    # Epoch 2 only as read-ahead, which the next fit() call trains on.
    assert sorted(k for e, k in seen if e == 2) == list(range(client.prefetch))
    assert {e for e, _ in seen} == {0, 1, 2}
    assert seq.epoch == 2
    seq.close()


def test_getitem_shapes_and_tuples(squares: StubServer) -> None:
    seq = Client(squares.url, "toy", batch_size=32, prefetch=2).keras(
        x=("image", "weight"), y="label"
    )
    x, y = seq[0]
    assert isinstance(x, tuple) and x[0].shape == (32, 8, 8) and x[1].shape == (32,)
    np.testing.assert_array_equal(y, seq[0][1])  # batch 0 of the same epoch: same labels
    assert seq[-1][1].shape == (32,)
    with pytest.raises(IndexError, match="8 batches"):
        seq[8]
    seq.close()


def test_unknown_field_is_named() -> None:
    with (
        serve_stub() as stub,
        pytest.raises(ValueError, match=r"no field 'img'.*\['image', 'index', 'label'\]"),
    ):
        Client(stub.url, "toy").keras(x="img", y="label")


# --- steps_per_epoch and workers: what Keras trains on (issue 13) ---------------------------


def _recording_model(trained: list[tuple[int, ...]]) -> keras.Model:
    """A model whose loss records the ``index`` (y) of every batch it trains on."""

    def loss(y_true: Any, y_pred: Any) -> Any:
        if y_true.device.type != "meta":  # Keras builds the loss on meta tensors first
            trained.append(tuple(round(float(i)) for i in y_true.detach().cpu().reshape(-1)))
        return keras.ops.mean(keras.ops.square(y_pred))

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8)), keras.layers.Flatten(), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss=loss)
    return model


def _stream_of(stub: StubServer, steps: int) -> list[tuple[int, ...]]:
    """The first ``steps`` batches of the client's stream: epoch 0, then 1, ..."""
    client = Client(stub.url, "toy", batch_size=32, seed=1)
    out = []
    for epoch in range(-(-steps // len(client))):
        out.extend(tuple(b["index"].tolist()) for b in client.iterate(epoch))
    return out[:steps]


def _fetched(stub: StubServer) -> set[tuple[int, int]]:
    return {
        (int(q["epoch"]), int(p.rsplit("/", 1)[1])) for p, q in stub.requests if "/batches/" in p
    }


@pytest.mark.parametrize(
    ("count", "steps_per_epoch", "epochs", "kwargs"),
    [
        (256, None, 2, {}),
        (256, 4, 4, {}),  # half an epoch: two Keras epochs per batchd epoch
        (256, 8, 2, {}),
        (256, 20, 2, {}),  # 2.5 epochs each
        (224, 3, 4, {}),  # 7 batches an epoch: Keras epochs straddle batchd epochs
        (256, 4, 3, {"workers": 2}),
        (256, 20, 2, {"workers": 2, "use_multiprocessing": True}),
        (256, None, 2, {"workers": 2}),
    ],
)
def test_keras_trains_on_successive_epochs_each_in_full(
    count: int, steps_per_epoch: int | None, epochs: int, kwargs: dict[str, Any]
) -> None:
    with serve_stub(arrays=_squares(count, 0)) as stub:
        seq = Client(stub.url, "toy", batch_size=32, seed=1).keras(x="image", y="index", **kwargs)
        n = len(seq)
        trained: list[tuple[int, ...]] = []
        _recording_model(trained).fit(
            seq, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=0
        )
        steps = (steps_per_epoch or n) * epochs  # Keras' "ran out of data" warning is an error
        # Exactly the stream, in order: nothing skipped (the build peek), nothing repeated.
        assert trained == _stream_of(stub, steps)
        assert (seq.epoch, seq.client.next_batch) == divmod(steps, n)
        # No epoch fetched and thrown away: beyond what was trained, only read-ahead.
        fetched = _fetched(stub)
        assert {divmod(p, n) for p in range(steps)} <= fetched
        assert len(fetched) <= steps + seq.client.prefetch
        seq.close()


def test_a_second_fit_carries_on_and_follows_a_moved_position(squares: StubServer) -> None:
    seq = Client(squares.url, "toy", batch_size=32, seed=1).keras(x="image", y="index")
    trained: list[tuple[int, ...]] = []
    model = _recording_model(trained)
    model.fit(seq, epochs=1, steps_per_epoch=12, verbose=0)
    model.fit(seq, epochs=1, steps_per_epoch=4, verbose=0)  # built: no peek this time
    assert trained == _stream_of(squares, 16)
    assert (seq.epoch, seq.client.next_batch) == (2, 0)
    seq.client.seek(0, 3)  # e.g. load_state_dict of an older checkpoint
    del trained[:]
    model.fit(seq, epochs=1, steps_per_epoch=2, verbose=0)
    assert trained == _stream_of(squares, 5)[3:]
    seq.close()


def test_keras_internals_this_adapter_reads_are_there() -> None:
    """Keras tells a PyDataset neither steps_per_epoch nor its build peek (batchd._keras).

    If this fails after a Keras upgrade, batchd falls back to a finite dataset and a
    peek that costs one batch: update _keras_caller to the new names.
    """
    from keras.src.backend.torch.trainer import TorchTrainer
    from keras.src.trainers.epoch_iterator import EpochIterator

    assert "steps_per_epoch" in EpochIterator.__init__.__code__.co_varnames
    assert hasattr(TorchTrainer, "_symbolic_build")
