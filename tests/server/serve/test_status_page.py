"""The status page in a real browser (Debian's chromium, driven by Playwright).

Playwright's own browser download cannot work offline, so the system chromium is
launched by path; where it (or Playwright) is missing the tests skip and say which.
.ci/run installs both.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import batchd
from serverproc import ServerProcess, batchd_top, tiny_pack

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip(
        "no chromium on PATH (apt-get install chromium): the page test needs a browser",
        allow_module_level=True,
    )
sync_api = pytest.importorskip(
    "playwright.sync_api", reason="Playwright drives the browser: pip install playwright"
)

TOKEN = "page-test-token"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    tiny_pack(root / "tiny", n=2000)
    return root


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


class Trainer(threading.Thread):
    """A client that trains slowly (sleeps per batch) until told to stop."""

    def __init__(self, url: str, seed: int, token: str | None = None) -> None:
        super().__init__(daemon=True)
        self.client = batchd.Client(url, "tiny", batch_size=10, seed=seed, token=token)
        self.done = threading.Event()

    def run(self) -> None:
        for _ in self.client.stream(0):
            if self.done.wait(0.05):
                return


def _open(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    return page, errors


def _batch_counter(page: Any) -> int:
    text = page.text_content("tr.job td.batch")
    return int(text.split("/")[0])


def test_the_page_shows_the_live_job_and_its_counter_advances(data: Path, browser: Any) -> None:
    with ServerProcess(data) as srv:
        trainer = Trainer(srv.url, seed=5)
        trainer.start()
        try:
            page, errors = _open(browser, srv.url + "/")
            page.wait_for_selector("tr.job td.batch", timeout=15_000)
            first = _batch_counter(page)
            time.sleep(2.5)
            second = _batch_counter(page)
            assert second > first, "the job's batch counter did not advance on the page"
            row = page.text_content("tr.job")
            assert "tiny" in row
            assert page.text_content("#datasets").count("tiny") == 1
            assert "live" in page.get_attribute("#state", "class")
            assert page.query_selector("tr.job svg.spark polyline") is not None
            trainer.done.set()
            trainer.join(10)
            time.sleep(1.5)  # one refresh after the last request: the page, the JSON and
            # batchd top now show one moment
            (job,) = batchd.server_status(srv.url)["jobs"]
            cells = page.text_content("tr.job td.batch")
            assert cells == f"{job['batch'] + 1} / {job['num_batches']}"
            assert page.text_content("tr.job td.epoch") == str(job["epoch"])
            assert page.text_content("tr.job td.trainers") == str(job["trainers"]) == "1"
            top = batchd_top(srv.url).stdout
            (line,) = [ln for ln in top.splitlines() if ln.startswith("tiny ") and "/1 " in ln]
            assert f"{job['batch'] + 1}/{job['num_batches']}" in line.split()
            assert errors == []
        finally:
            trainer.done.set()
            trainer.join(10)


def test_a_token_server_refuses_the_page_until_logged_in(data: Path, browser: Any) -> None:
    with ServerProcess(data, token=TOKEN) as srv:
        page, errors = _open(browser, srv.url + "/status")
        assert page.query_selector("form input[name=token]") is not None
        assert page.query_selector("#jobs") is None  # no status without the token
        page.fill("input[name=token]", "wrong")
        page.click("button[type=submit]")
        assert "not this server" in page.content()
        page.fill("input[name=token]", TOKEN)
        page.click("button[type=submit]")
        page.wait_for_selector("#state.live", timeout=15_000)
        assert page.url.endswith("/status")
        # The browser's console reports the refused page's 401s as errors: only those.
        assert all("401" in e for e in errors), errors
