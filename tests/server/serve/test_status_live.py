"""``/v1/status``, the page and ``batchd top`` against a real server and real clients.

Tolerances for data stall (the share of time a trainer waits for batches): a trainer
that sleeps 40 ms per batch of a fast server stalls under 10%; one that never sleeps
stalls over 75% (the rest is the loop's own work between batches).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

import batchd
from batchd_server.format import open_dataset
from batchd_server.format.direct import open_direct
from serverproc import ServerProcess, batchd_top, tiny_pack

TOKEN = "s3cret-status-token"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_pack(root / "tiny", n=4000)
    (root / "notapack").mkdir()
    return root


@pytest.fixture(scope="module")
def server(data: Path) -> Iterator[ServerProcess]:
    with ServerProcess(data) as srv:
        yield srv


def status(srv: ServerProcess) -> dict:
    return batchd.server_status(srv.url)


def job_of(doc: dict, seed: int) -> dict:
    (job,) = [j for j in doc["jobs"] if j["seed"] == seed]
    return job


def metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = re.escape(name) + (r"\{" + re.escape(want) + r"\}" if labels else r"(?:\{.*\})?")
    pattern += r" (\S+)"
    return sum(float(m) for m in re.findall(r"^" + pattern + "$", text, re.M))


def test_a_known_epoch_is_reported_as_it_ran_and_agrees_with_metrics(
    server: ServerProcess,
) -> None:
    client = batchd.Client(server.url, "tiny", batch_size=50, seed=11)
    n = sum(1 for _ in client.iterate(0))
    assert n == 80
    doc = status(server)
    job = job_of(doc, 11)
    assert (job["epoch"], job["batch"], job["num_batches"]) == (0, 79, 80)
    assert (job["dataset"], job["batch_size"], job["trainers"]) == ("tiny", 50, 1)
    assert job["split"] is None and job["augment"] == "[]"
    assert job["eta_s"] == 0
    assert job["images_per_s"] > 0
    text = httpx.get(server.url + "/metrics").text
    assert metric(text, "batchd_job_last_batch", job=job["metrics_job"]) == 79
    s = doc["server"]
    assert s["batches_served"] == metric(text, "batchd_batches_served_total")
    assert s["cache_hits"] == metric(text, "batchd_cache_hits_total")
    assert s["cache_misses"] == metric(text, "batchd_cache_misses_total")
    assert s["responses_4xx"] == metric(text, "batchd_http_responses_total", status="4xx")
    (tiny,) = [d for d in doc["datasets"] if d["name"] == "tiny"]
    assert (tiny["count"], tiny["storage"], tiny["available"]) == (4000, "raw", True)
    assert tiny["fingerprint"] == client.info.fingerprint
    assert 0 <= tiny["resident"] <= 1 and tiny["reads"].startswith("mapped")
    # Reads through the mapping are not counted as preadv reads.
    assert tiny["read_hit_rate"] is None and tiny["read_wait_s"] == 0
    (junk,) = [d for d in doc["datasets"] if d["name"] == "notapack"]
    assert junk["available"] is False and junk["error"]
    assert str(server.data) not in str(doc)  # no absolute path of the server's disk


def test_preadv_reads_are_reported_as_metrics_counts_them(data: Path) -> None:
    with ServerProcess(data, args=["--no-leases"]) as srv:
        n = sum(len(b["label"]) for b in batchd.Client(srv.url, "tiny", batch_size=500).iterate(0))
        assert n == 4000
        (tiny,) = [d for d in status(srv)["datasets"] if d["name"] == "tiny"]
        text = httpx.get(srv.url + "/metrics").text
        top = batchd_top(srv.url).stdout
    assert tiny["reads"].startswith("preadv")
    ready = metric(text, "batchd_read_ready_bytes_total", dataset="tiny")
    waited = metric(text, "batchd_read_waited_bytes_total", dataset="tiny")
    assert ready + waited >= 4000 * 16 * 16 * 3  # every image once, at least
    assert tiny["read_hit_rate"] == round(ready / (ready + waited), 4)
    assert tiny["read_wait_s"] == pytest.approx(
        metric(text, "batchd_read_wait_seconds_total", dataset="tiny"), abs=1e-3
    )
    lines = top.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("DATASET"))
    head, row = lines[head], next(line for line in lines[head:] if line.startswith("tiny "))
    assert "READ HITS" in head and "IO WAIT" in head
    assert f"{100 * tiny['read_hit_rate']:.1f}%" in row.split()


def test_errors_are_counted_by_class(server: ServerProcess) -> None:
    before = status(server)["server"]["responses_4xx"]
    for _ in range(3):
        assert httpx.get(server.url + "/v1/datasets/nope").status_code == 404
    assert status(server)["server"]["responses_4xx"] == before + 3


def _run(client: batchd.Client, seconds: float, sleep: float) -> None:
    end = time.monotonic() + seconds
    for _ in client.stream(0):
        if time.monotonic() > end:
            break
        if sleep:
            time.sleep(sleep)


def test_stall_is_near_zero_for_a_sleeping_trainer_and_near_one_for_an_eager_one(
    server: ServerProcess,
) -> None:
    _run(batchd.Client(server.url, "tiny", batch_size=16, seed=21), 2.5, 0.04)
    _run(batchd.Client(server.url, "tiny", batch_size=16, seed=22, prefetch=1), 2.5, 0.0)
    doc = status(server)
    assert job_of(doc, 21)["stall"] < 0.10
    assert job_of(doc, 22)["stall"] > 0.75


def test_trainers_sharing_a_job_are_counted(server: ServerProcess) -> None:
    clients = [batchd.Client(server.url, "tiny", batch_size=100, seed=31) for _ in range(3)]
    threads = [threading.Thread(target=lambda c=c: list(c.iterate(0))) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    job = job_of(status(server), 31)
    assert job["trainers"] == 3
    assert job["batch"] == 39


def test_a_generic_client_gets_batches_and_no_stall(server: ServerProcess) -> None:
    for k in range(3):
        r = httpx.get(
            server.url + "/v1/datasets/tiny/batches/" + str(k),
            params={"batch_size": 10, "seed": 41},
        )
        assert r.status_code == 200
    job = job_of(status(server), 41)
    assert job["stall"] is None and job["trainers"] == 1 and job["batch"] == 2


def test_the_page_is_served_self_contained(server: ServerProcess) -> None:
    for path in ("/", "/status"):
        r = httpx.get(server.url + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "v1/status" in r.text
        assert not re.search(r"""(src|href)=["']?https?://""", r.text)  # no CDN


def test_status_is_in_the_openapi_schema(server: ServerProcess) -> None:
    schema = httpx.get(server.url + "/openapi.json").json()
    op = schema["paths"]["/v1/status"]["get"]
    ref = op["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/Status")
    assert {"jobs", "datasets", "server"} <= set(
        schema["components"]["schemas"]["Status"]["properties"]
    )


def test_top_once_prints_the_job(server: ServerProcess) -> None:
    list(batchd.Client(server.url, "tiny", batch_size=400, seed=51).iterate(0))
    out = batchd_top(server.url).stdout
    (line,) = [ln for ln in out.splitlines() if ln.startswith("tiny") and " 51 " in ln]
    assert "10/10" in line.split()
    assert any(ln.startswith("notapack") and "unavailable" in ln for ln in out.splitlines())


def test_top_says_when_no_server_answers() -> None:
    got = batchd_top("http://127.0.0.1:9", check=False)
    assert got.returncode == 1 and got.stderr.startswith("error:") and "127.0.0.1:9" in got.stderr


def test_under_a_token_the_page_needs_a_login_and_the_token_is_never_logged(
    data: Path,
) -> None:
    with ServerProcess(data, token=TOKEN, args=["--log-level", "debug"]) as srv:
        with httpx.Client(base_url=srv.url) as anon:
            page = anon.get("/")
            assert page.status_code == 401 and "<form" in page.text and TOKEN not in page.text
            assert anon.get("/v1/status").status_code == 401
            wrong = anon.post("/login", data={"token": "guess"})
            assert wrong.status_code == 401 and "not this server" in wrong.text
            assert "batchd_token" not in wrong.headers.get("set-cookie", "")
        with httpx.Client(base_url=srv.url) as browser:
            ok = browser.post("/login", data={"token": TOKEN})
            assert ok.status_code == 303 and ok.headers["location"] == "/status"
            cookie = ok.headers["set-cookie"].lower()
            assert "httponly" in cookie and "samesite=strict" in cookie
            assert browser.get("/status").status_code == 200
            assert browser.get("/v1/status").json()["server"]["uptime_s"] >= 0
        assert batchd.server_status(srv.url, token=TOKEN)["version"] == batchd.__version__
        log = srv.log()
    assert "POST /login" in log  # the access log is on (debug), and holds no token
    assert TOKEN not in log


@pytest.mark.parametrize("flag", ["--direct-reads", "--no-direct-reads"])
def test_a_pack_over_the_memory_budget_is_read_directly_unless_told(
    tmp_path: Path, flag: str
) -> None:
    """A real server under a small --memory-budget: the read path, and the client's bytes."""
    tiny_pack(tmp_path / "big", n=64, hw=64)  # 768 KiB of 12 KiB rows
    probe = open_direct(tmp_path / "big" / "image.raw")
    if isinstance(probe, str):  # tests/server/format/test_direct.py tests the refusal
        pytest.skip(f"the test folder's filesystem cannot read directly: {probe}")
    probe.close()
    args = ["--memory-budget", "1MiB", "--cache-bytes", "0", flag]
    with ServerProcess(tmp_path, args=args) as srv:
        got = list(batchd.Client(srv.url, "big", batch_size=16, seed=2).iterate(1))
        (big,) = [d for d in status(srv)["datasets"] if d["name"] == "big"]
    with open_dataset(tmp_path / "big") as ds:
        images = ds.array("image")
        for b in got:
            np.testing.assert_array_equal(b["image"], images[b["index"]])
    assert sorted(i for b in got for i in b["index"].tolist()) == list(range(64))
    assert "memory budget" in big["reads"]
    if flag == "--direct-reads":
        # Only the labels (8 bytes a row, read buffered) ever come from the page cache.
        assert big["reads"].startswith("direct (") and big["read_hit_rate"] < 0.01
    else:
        assert big["reads"].startswith("preadv (") and big["read_hit_rate"] is not None
