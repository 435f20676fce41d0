"""The HTTP API against real ``batchd serve`` processes on free loopback ports."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from batchd.wire import decode_batch
from serverproc import ServerProcess, tiny_pack

TOKEN = "s3cret-token"
AUG = '[{"op":"random_crop","size":12},{"op":"hflip"}]'
BATCH = "/v1/datasets/tiny/batches"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_pack(root / "tiny", n=40, hw=16)
    return root


@pytest.fixture(scope="module")
def server(data: Path) -> Iterator[ServerProcess]:
    with ServerProcess(data, token=TOKEN) as srv:
        yield srv


@pytest.fixture
def client(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.client() as c:
        yield c


def params(**kw: Any) -> dict[str, Any]:
    return {"batch_size": 8, "seed": 3, "epoch": 1, **kw}


def test_list_and_info(client: httpx.Client) -> None:
    listed = client.get("/v1/datasets").json()["datasets"]
    assert [d["name"] for d in listed] == ["tiny"] and listed[0]["count"] == 40
    info = client.get(
        "/v1/datasets/tiny", params={"batch_size": 16, "world_size": 3, "augment": AUG}
    ).json()
    assert info["fields"]["image"] == {
        "dtype": "|u1",
        "shape": [16, 16, 3],
        "role": "image",
        "encoding": "raw",
    }
    assert info["batch_fields"]["image"] == {"dtype": "|u1", "shape": [12, 12, 3]}
    assert info["plan"] == {
        "batch_size": 16,
        "shuffle": True,
        "drop_last": False,
        "rank": 0,
        "world_size": 3,
        "samples_per_rank": 14,
        "num_batches": 1,
        "padded": 2,
        "dropped": 0,
    }
    assert info["fingerprint"] == listed[0]["fingerprint"]


def test_batch_body_decodes_and_headers(client: httpx.Client) -> None:
    r = client.get(f"{BATCH}/1", params=params(augment=AUG))
    assert r.status_code == 200 and r.headers["content-type"] == "application/msgpack"
    batch = decode_batch(r.content)
    assert batch.fields["image"].shape == (8, 12, 12, 3)
    np.testing.assert_array_equal(batch.fields["label"], batch.index)
    assert (batch.epoch, batch.batch) == (1, 1)
    assert r.headers["x-batchd-fingerprint"] == batch.fingerprint
    assert r.headers["x-batchd-batches"] == "5"
    assert client.get(f"{BATCH}/1", params=params(augment=AUG)).headers["x-batchd-cache"] == "hit"


def test_same_request_same_bytes_across_processes(data: Path, client: httpx.Client) -> None:
    urls = [(f"{BATCH}/{k}", params(augment=AUG, epoch=e)) for k in (0, 4) for e in (0, 1)]
    first = [client.get(u, params=p).content for u, p in urls]
    with ServerProcess(data, args=["--threads", "1"]) as other, other.client() as c2:
        second = [c2.get(u, params=p).content for u, p in urls]
    assert first == second
    assert first[0] != first[1]  # epochs differ


def test_epochs_cover_every_sample_once(client: httpx.Client) -> None:
    for epoch in (0, 1):
        ids = np.concatenate(
            [
                decode_batch(client.get(f"{BATCH}/{k}", params=params(epoch=epoch)).content).index
                for k in range(5)
            ]
        )
        assert sorted(ids.tolist()) == list(range(40))


BAD: list[tuple[str, dict[str, Any], int, str, str]] = [
    ("/v1/datasets/nope/batches/0", params(), 404, "unknown_dataset", "served: ['tiny']"),
    (f"{BATCH}/5", params(), 404, "batch_out_of_range", "5 batches"),
    (f"{BATCH}/-1", params(), 404, "batch_out_of_range", "5 batches"),
    (f"{BATCH}/x", params(), 400, "invalid_parameter", "'k'"),
    (f"{BATCH}/0", params(batch_size=0), 400, "invalid_parameter", "batch_size: must be in 1.."),
    (f"{BATCH}/0", {}, 400, "invalid_parameter", "'batch_size'"),
    (f"{BATCH}/0", params(rank=2, world_size=2), 400, "invalid_parameter", "rank"),
    (f"{BATCH}/0", params(world_size=0), 400, "invalid_parameter", "world_size: must be in 1.."),
    (f"{BATCH}/0", params(seed=-1), 400, "invalid_parameter", "seed: must be in 0.."),
    (f"{BATCH}/0", params(seed=2**63), 400, "invalid_parameter", "seed: must be in 0.."),
    (f"{BATCH}/0", params(epoch=2**64), 400, "invalid_parameter", "epoch: must be in 0.."),
    (f"{BATCH}/0", params(shuffle="maybe"), 400, "invalid_parameter", "'shuffle'"),
    (f"{BATCH}/0", params(augment='[{"op":"zoom"}]'), 400, "invalid_pipeline", "zoom"),
    (
        f"{BATCH}/0",
        params(augment='[{"op":"rotate","degrees":"NaN"}]'),
        400,
        "invalid_pipeline",
        "rotate",
    ),
    (f"{BATCH}/0", params(augment="x" * 20000), 400, "invalid_parameter", "'augment'"),
    # splits (issue 13): malformed, empty, out of range, overlapping, badly stratified
    (f"{BATCH}/0", params(split="[:80"), 400, "invalid_parameter", "split: '[:80'"),
    (f"{BATCH}/0", params(split="train[:80%]"), 400, "invalid_parameter", "drop the name"),
    (f"{BATCH}/0", params(split="[80%:20%]"), 400, "invalid_parameter", "is empty"),
    (f"{BATCH}/0", params(split="[10%:11%]"), 400, "invalid_parameter", "selects none of the 40"),
    (f"{BATCH}/0", params(split="[:41]"), 400, "invalid_parameter", "past the end of the pack"),
    (f"{BATCH}/0", params(split="[:50%]+[25%:]"), 400, "invalid_parameter", "overlap"),
    (f"{BATCH}/0", params(split="x" * 300), 400, "invalid_parameter", "at most 256"),
    (f"{BATCH}/0", params(split="[:50%]", split_seed=-1), 400, "invalid_parameter", "split_seed"),
    (f"{BATCH}/0", params(stratify="label"), 400, "invalid_parameter", "give split too"),
    (f"{BATCH}/0", params(split="[:50%]", stratify="x"), 400, "invalid_parameter", "no field 'x'"),
    (f"{BATCH}/4", params(split="[:50%]"), 404, "batch_out_of_range", "split=[:50%]"),
    ("/v1/datasets/tiny", params(split="[:0%]"), 400, "invalid_parameter", "split: '[:0%]'"),
    ("/v1/datasets/a%00b/batches/0", params(), 400, "invalid_name", "plain directory name"),
    ("/v1/datasets/.hidden", {}, 400, "invalid_name", "plain directory name"),
    ("/v1/datasets/" + "n" * 256, {}, 400, "invalid_name", "255 bytes"),
    ("/v1/datasets/..%2ftiny/batches/0", params(), 404, "not_found", "no route"),
    ("/v1/datasets/tiny%2f..%2f..%2fetc", {}, 404, "not_found", "no route"),
    ("/v2/datasets", {}, 404, "not_found", "no route"),
]


@pytest.mark.parametrize(("path", "query", "status", "code", "needle"), BAD)
def test_bad_input_is_a_json_4xx(
    client: httpx.Client, path: str, query: dict[str, Any], status: int, code: str, needle: str
) -> None:
    r = client.get(path, params=query)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == code
    assert needle in body["detail"]
    assert client.get(f"{BATCH}/0", params=params()).status_code == 200  # still serving


def test_dot_dot_in_raw_path_never_leaves_data(server: ServerProcess) -> None:
    """httpx normalises '..' away, so send the raw bytes."""
    for target in (b"/v1/datasets/..", b"/v1/datasets/../batches/0?batch_size=1"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
            s.sendall(
                b"GET "
                + target
                + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + TOKEN.encode()
                + b"\r\nConnection: close\r\n\r\n"
            )
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        status = int(reply.split(b" ", 2)[1])
        assert status in (400, 404), reply
        assert b'"error"' in reply


def test_post_is_405_json(client: httpx.Client) -> None:
    r = client.post("/v1/datasets")
    assert r.status_code == 405 and r.json()["error"] == "method_not_allowed"


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 401),
        ({"Authorization": "Bearer wrong"}, 401),
        ({"Authorization": b"Bearer s3cret-t\xc3\xb6ken"}, 401),
        ({"Authorization": b"Bearer \xff\xfe"}, 401),
        ({"Authorization": TOKEN}, 401),  # no scheme
        ({"Authorization": f"Bearer {TOKEN}"}, 200),
    ],
)
def test_auth(server: ServerProcess, headers: dict[str, Any], status: int) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/v1/datasets", "/metrics", "/openapi.json", f"{BATCH}/0?batch_size=4"):
            r = c.get(path, headers=headers)
            assert r.status_code == status, (path, r.text)
            if status == 401:
                assert r.json()["error"] == "unauthorized"
                assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/healthz").json() == {"status": "ok"}  # always open


def _samples(client: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_metrics_counters_move_with_the_traffic(client: httpx.Client) -> None:
    tiny = (("dataset", "tiny"),)
    before = _samples(client)
    query = params(seed=77)  # a job no other test asks for: its batches start uncached
    first = client.get(f"{BATCH}/1", params=query)
    again = client.get(f"{BATCH}/1", params=query)  # the same batch: from the cache
    assert client.get(f"{BATCH}/99", params=query).status_code == 404
    after = _samples(client)

    def moved(name: str, labels: tuple[tuple[str, str], ...] = ()) -> float:
        return after.get((name, labels), 0.0) - before.get((name, labels), 0.0)

    assert moved("batchd_batches_served_total", tiny) == 2
    body = len(first.content) + len(again.content)
    assert moved("batchd_bytes_served_total", tiny) == body
    assert moved("batchd_cache_hits_total") >= 1 and moved("batchd_cache_misses_total") >= 1
    assert moved("batchd_batch_latency_seconds_count") == 2
    assert moved("batchd_requests_rejected_total", (("error", "batch_out_of_range"),)) == 1
    assert after[("batchd_dataset_resident_bytes", tiny)] > 0
    assert any(name == "batchd_job_last_batch" and v == 1 for (name, _), v in after.items())


def test_openapi_lists_the_routes(client: httpx.Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/healthz", "/metrics", "/v1/datasets", "/v1/datasets/{name}"} <= set(paths)
    batch = paths["/v1/datasets/{name}/batches/{k}"]["get"]
    assert "application/msgpack" in batch["responses"]["200"]["content"]
    assert {p["name"] for p in batch["parameters"]} >= {
        "batch_size",
        "seed",
        "epoch",
        "shuffle",
        "drop_last",
        "rank",
        "world_size",
        "augment",
    }


def test_unix_socket(data: Path, tmp_path: Path) -> None:
    sock = tmp_path / "batchd.sock"
    with ServerProcess(data, uds=sock) as srv, srv.client() as c:
        batch = decode_batch(c.get(f"{BATCH}/0", params=params()).content)
        assert len(batch.index) == 8


def test_added_and_replaced_packs_without_restart(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    tiny_pack(root / "tiny", n=40)
    with ServerProcess(root) as srv, srv.client() as c:
        before = c.get(f"{BATCH}/0", params=params(shuffle=False))
        assert c.get("/v1/datasets/later").status_code == 404

        tiny_pack(root / "later", n=12)
        assert c.get("/v1/datasets/later").json()["count"] == 12
        time.sleep(0.3)  # listing rescans at most every 0.25 s
        names = {d["name"] for d in c.get("/v1/datasets").json()["datasets"]}
        assert names == {"tiny", "later"}

        tiny_pack(root / "tiny", n=24, seed=7, overwrite=True)
        after = c.get(f"{BATCH}/0", params=params(shuffle=False))
        assert after.headers["x-batchd-fingerprint"] != before.headers["x-batchd-fingerprint"]
        new = decode_batch(after.content)
        assert c.get("/v1/datasets/tiny").json()["count"] == 24
        from batchd_server.format import open_dataset

        with open_dataset(root / "tiny") as ds:
            np.testing.assert_array_equal(new.fields["image"], ds.array("image")[:8])

        broken = root / "broken"
        broken.mkdir()
        (broken / "batchd.header").write_bytes(b"junk")
        time.sleep(0.3)
        listed = {d["name"]: d for d in c.get("/v1/datasets").json()["datasets"]}
        assert listed["broken"]["available"] is False
        r = c.get("/v1/datasets/broken/batches/0", params=params())
        assert r.status_code == 404 and r.json()["error"] == "dataset_unavailable"
        assert c.get(f"{BATCH}/0", params=params()).status_code == 200


def test_folders_that_are_not_packs_are_listed_with_the_reason(tmp_path: Path) -> None:
    """An empty folder and a folder of images under --data: listed, unavailable, and why."""
    root = tmp_path / "data"
    root.mkdir()
    tiny_pack(root / "tiny", n=8)
    (root / "empty").mkdir()
    photos = root / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(b"\xff\xd8")
    with ServerProcess(root) as srv, srv.client() as c:
        listed = {d["name"]: d for d in c.get("/v1/datasets").json()["datasets"]}
        assert set(listed) == {"tiny", "empty", "photos"} and listed["tiny"]["available"]
        assert listed["empty"] == {
            "name": "empty",
            "available": False,
            "error": "an empty folder, not a batchd pack",
        }
        assert listed["photos"]["available"] is False
        assert listed["photos"]["error"].startswith("a folder of 3 files without batchd.header")
        r = c.get("/v1/datasets/photos/batches/0", params=params())
        assert r.status_code == 404 and r.json()["error"] == "dataset_unavailable"
        assert "batchd pack SOURCE OUT" in r.json()["detail"]
        assert f"not serving {photos}: a folder of 3 files" in srv.log()
