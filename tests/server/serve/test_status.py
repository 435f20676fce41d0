"""The job board's figures (progress, rate, ETA, trainers, stall) on a clock we drive."""

from __future__ import annotations

from typing import Any

import pytest

from batchd_server.serve.metrics import Metrics
from batchd_server.serve.status import (
    RATE_S,
    WINDOW_S,
    ClientMark,
    JobBoard,
    client_mark,
)
from batchd_server.serve.top import render


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ABOUT: dict[str, Any] = {
    "dataset": "pets",
    "seed": 3,
    "batch_size": 10,
    "shuffle": True,
    "drop_last": False,
    "rank": 0,
    "world_size": 1,
    "split": None,
    "augment": "[]",
}


def ask(
    board: JobBoard,
    k: int,
    *,
    epoch: int = 0,
    client: str = "a",
    wait: float | None = None,
    key: tuple[Any, ...] = ("pets", 3),
) -> None:
    board.record(
        key,
        ABOUT,
        metrics_job="pets:abcd",
        epoch=epoch,
        k=k,
        num_batches=100,
        batch_size=10,
        rows=10,
        mark=ClientMark(client, wait),
    )


def test_progress_rate_and_eta_of_a_steady_trainer() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(40):  # 4 batches/s = 40 images/s for 10 s
        ask(board, k)
        clock.now += 0.25
    (job,) = board.jobs()
    assert (job["epoch"], job["batch"], job["num_batches"]) == (0, 39, 100)
    assert job["images_per_s"] == pytest.approx(40, rel=0.05)
    assert job["eta_s"] == pytest.approx(60 / 4, rel=0.05)  # 60 batches left at 4/s
    assert job["trainers"] == 1
    assert job["stall"] is None  # no client sent its wait
    assert job["dataset"] == "pets" and job["metrics_job"] == "pets:abcd"
    assert sum(job["sparkline"]) * 5 == pytest.approx(400, rel=0.01)  # every row, in 5 s buckets


def test_shared_job_counts_trainers_and_progress_once() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(20):
        for who in ("a", "b", "c"):
            ask(board, k, client=who)
        clock.now += 0.5
    (job,) = board.jobs()
    assert job["trainers"] == 3
    assert job["images_per_s"] == pytest.approx(3 * 20, rel=0.05)  # rows to all three
    assert job["eta_s"] == pytest.approx(80 / 2, rel=0.05)  # progress: 2 new batches/s


def test_stall_is_the_share_of_time_spent_waiting() -> None:
    clock = Clock()
    board = JobBoard(clock)
    waited = {"sleeper": 0.0, "eager": 0.0}
    for k in range(100):
        clock.now += 0.1
        waited["sleeper"] += 0.002  # trains 98 ms of each 100
        waited["eager"] += 0.095  # waits nearly all the time
        ask(board, k, client="sleeper", wait=waited["sleeper"], key=("s",))
        ask(board, k, client="eager", wait=waited["eager"], key=("e",))
    jobs = board.jobs()
    assert len(jobs) == 2
    stalls = sorted(j["stall"] for j in jobs)
    assert stalls[0] == pytest.approx(0.02, abs=0.005)
    assert stalls[1] == pytest.approx(0.95, abs=0.01)


def test_stall_window_forgets_an_old_stall() -> None:
    clock = Clock()
    board = JobBoard(clock)
    waited = 0.0
    for k in range(300):  # 150 s: stalled for the first 50 s, then not at all
        clock.now += 0.5
        waited += 0.5 if k < 100 else 0.0
        ask(board, k, wait=waited)
    (job,) = board.jobs()
    assert job["stall"] == pytest.approx(0.0, abs=0.02)


def test_a_wait_that_arrives_out_of_order_is_ignored() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k, wait in enumerate([0.0, 0.5, 1.0, 0.9, 1.5, 1.4, 2.0]):  # prefetch threads race
        clock.now += 1.0
        ask(board, k, wait=wait)
    (job,) = board.jobs()
    assert job["stall"] == pytest.approx(2.0 / 6.0, abs=0.01)


def test_jobs_expire_after_the_window_and_a_new_epoch_restarts_progress() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(100):
        ask(board, k)
    ask(board, 0, epoch=1)
    (job,) = board.jobs()
    assert (job["epoch"], job["batch"]) == (1, 0)
    ask(board, 99, epoch=0)  # a late trainer on the old epoch does not move progress back
    assert board.jobs()[0]["epoch"] == 1
    clock.now += WINDOW_S + 1
    assert board.jobs() == []


def test_a_trainer_restarted_from_an_earlier_epoch_is_followed() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(30):
        ask(board, k, epoch=5)
        clock.now += 0.1
    clock.now += RATE_S + 1  # the run stops; it restarts from epoch 0 within the minute
    for k in range(3):
        ask(board, k, epoch=0)
    (job,) = board.jobs()
    assert (job["epoch"], job["batch"]) == (0, 2)


def test_images_per_s_is_over_the_last_seconds_only() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(50):
        ask(board, k)
        clock.now += 0.1
    clock.now += RATE_S + 1  # silent since
    (job,) = board.jobs()
    assert job["images_per_s"] == 0
    assert job["eta_s"] is None
    assert job["idle_s"] == pytest.approx(RATE_S + 1.1, abs=0.01)


@pytest.mark.parametrize(
    ("client", "wait", "peer", "want"),
    [
        ("a1b2.123", "1.500", "127.0.0.1", ClientMark("a1b2.123", 1.5)),
        (None, None, "10.0.0.7", ClientMark("host:10.0.0.7", None)),
        (None, None, None, ClientMark("host:local", None)),
        ("bad id with spaces", "nan", "::1", ClientMark("host:::1", None)),
        ("x" * 65, "-1", "::1", ClientMark("host:::1", None)),
        ("ok", "soon", "::1", ClientMark("ok", None)),
        ("ok", "1e13", "::1", ClientMark("ok", None)),
    ],
)
def test_client_mark_ignores_malformed_headers(
    client: str | None, wait: str | None, peer: str | None, want: ClientMark
) -> None:
    assert client_mark(client, wait, peer) == want


def test_top_renders_the_figures_of_the_document() -> None:
    clock = Clock()
    board = JobBoard(clock)
    for k in range(12):
        ask(board, k, wait=0.01 * k)
        clock.now += 0.5
    doc = {
        "version": "0.1.0",
        "datasets": [
            {
                "name": "pets",
                "available": True,
                "count": 1000,
                "bytes": 3 << 20,
                "storage": "raw",
                "fingerprint": "0123456789abcdef",
                "resident": 0.5,
                "reads": "preadv (testing)",
                "read_hit_rate": 0.875,
                "read_wait_s": 12.34,
            },
            {"name": "junk", "available": False, "error": "no header.json"},
        ],
        "jobs": board.jobs(),
        "server": {
            "uptime_s": 75,
            "cpu_percent": 50.0,
            "cores": 2,
            "queued": 0,
            "inflight": 1,
            "readahead_running": 1,
            "readahead_depth": 2,
            "cache_bytes": 1 << 20,
            "cache_hit_rate": 0.25,
            "batches_served": 12,
            "responses_4xx": 3,
            "responses_5xx": 0,
        },
    }
    text = render(doc)
    lines = text.splitlines()
    job = next(line for line in lines if line.startswith("pets "))
    assert "12/100" in job.split() and "2.0%" in job.split()  # k/n and stall
    assert "up 1m 15s" in lines[0] and "4xx 3" in lines[0] and "hit 25.0%" in lines[0]
    assert any("1,000" in line and "50.0%" in line and "3.0 MiB" in line for line in lines)
    assert any("87.5%" in line and "12.3 s" in line for line in lines)  # read hits, I/O wait
    assert any(line.startswith("junk") and "unavailable: no header.json" in line for line in lines)


def test_the_progress_gauge_keeps_the_furthest_batch_of_out_of_order_requests() -> None:
    metrics = Metrics()
    for k in (0, 2, 3, 1):  # a client's prefetch: requests 1..3 race each other
        metrics.job_progress("tiny:0", k)
    metrics.job_progress("tiny:1", 0)  # another job (or the next epoch) has its own
    values = {s.labels["job"]: s.value for f in metrics.progress.collect() for s in f.samples}
    assert values == {"tiny:0": 3, "tiny:1": 0}
