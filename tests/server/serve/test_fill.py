"""serve.fill: who may walk a batch's samples at the same time."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchd_server.augment import Pipeline
from batchd_server.format import open_dataset
from batchd_server.serve.fill import filler
from serverproc import tiny_pack

CROP_FLIP = '[{"op":"random_crop","size":12},{"op":"hflip"}]'
CROP_BRIGHTEN = '[{"op":"random_crop","size":12},{"op":"brightness","delta":0.2}]'


def _most_at_once(tmp_path: Path, spec: str, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many threads were inside Pipeline.run at once while two fill halves of a batch."""
    ds = open_dataset(tiny_pack(tmp_path / "tiny"))
    pipeline = Pipeline.parse(spec)
    ids = np.arange(32, dtype=np.int64)
    out = {
        name: np.empty((32, *shape), dt)
        for name, (dt, shape) in pipeline.output_fields(ds.fields).items()
    }
    inside, most, lock = 0, 0, threading.Lock()
    run = Pipeline.run

    def counting(self: Pipeline, *args: Any, **kw: Any) -> None:
        nonlocal inside, most
        with lock:
            inside += 1
            most = max(most, inside)
        time.sleep(0.05)  # long enough for the other half to arrive
        try:
            run(self, *args, **kw)
        finally:
            with lock:
                inside -= 1

    monkeypatch.setattr(Pipeline, "run", counting)
    fill = filler(ds, pipeline, ids, 0, 0, out)
    halves = [threading.Thread(target=fill, args=ab) for ab in ((0, 16), (16, 32))]
    for t in halves:
        t.start()
    for t in halves:
        t.join()
    ds.close()
    return most


def test_copy_only_samples_are_walked_by_one_thread_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Each such sample releases the GIL for its copy: two threads would trade it per sample.
    assert _most_at_once(tmp_path, CROP_FLIP, monkeypatch) == 1


def test_samples_with_real_work_are_walked_in_parallel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _most_at_once(tmp_path, CROP_BRIGHTEN, monkeypatch) == 2
