"""Keras: the PyDataset adapter trains a model, with workers, with a validation client."""

from __future__ import annotations

from collections.abc import Iterator

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


def test_fit_with_worker_threads_sees_each_batch_once_per_epoch(squares: StubServer) -> None:
    client = Client(squares.url, "toy", batch_size=32)
    seq = client.keras(x="image", y="label", sample_weight="weight", workers=2)
    _model().fit(seq, epochs=2, verbose=0)  # Keras shuffles batch order itself here
    seen = [
        (int(q["epoch"]), int(p.rsplit("/", 1)[1])) for p, q in squares.requests if "/batches/" in p
    ]
    epochs = sorted({e for e, _ in seen})
    # Keras' build peek may count as epoch 0 with workers (see batchd._keras); every
    # epoch requested is whole, each batch fetched once.
    assert epochs in ([0, 1], [0, 1, 2])
    for e in epochs:
        assert sorted(k for e2, k in seen if e2 == e) == list(range(8))
    assert seq.epoch == epochs[-1] + 1
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
