"""Make docs/img/status.png: the status page with two live jobs (README, issue 17).

    .venv/bin/python docs/status_screenshot.py

Packs two small datasets, serves them, runs two trainers (one slow, one eager, so
their data stall differs) for 40 s, screenshots the page in Debian's chromium and
prints the same moment as `batchd top` shows it.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "client"), str(ROOT / "server")]

from playwright.sync_api import sync_playwright  # noqa: E402

import batchd  # noqa: E402
from batchd_server.serve.top import render  # noqa: E402
from serverproc import ServerProcess, tiny_pack  # noqa: E402

RUN_S = 40.0


def train(client: batchd.Client, sleep: float, stop: threading.Event) -> None:
    for _ in client.stream(0):
        if stop.wait(sleep) if sleep else stop.is_set():
            return


def main() -> None:
    data = Path(tempfile.mkdtemp(prefix="batchd-shot-"))
    tiny_pack(data / "pets", n=20_000, hw=64)
    tiny_pack(data / "scans", n=5_000, hw=64, seed=1)
    augment = [{"op": "random_crop", "size": 56}, {"op": "hflip"}]
    stop = threading.Event()
    with ServerProcess(data) as srv:
        jobs = [
            (batchd.Client(srv.url, "pets", batch_size=256, augment=augment, split="[:80%]"), 0.25),
            (batchd.Client(srv.url, "scans", batch_size=64, seed=7), 0.0),
        ]
        threads = [threading.Thread(target=train, args=(c, s, stop)) for c, s in jobs]
        for t in threads:
            t.start()
        time.sleep(RUN_S)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"), args=["--no-sandbox"]
            )
            page = browser.new_page(viewport={"width": 1500, "height": 640})
            page.goto(srv.url + "/")
            page.wait_for_selector("tr.job", timeout=15_000)
            time.sleep(1.5)
            out = ROOT / "docs" / "img" / "status.png"
            page.screenshot(path=str(out), full_page=True)
            browser.close()
        print(render(batchd.server_status(srv.url)))  # the README's `batchd top` frame
        stop.set()
        for t in threads:
            t.join(30)
    shutil.rmtree(data)
    print(out)


if __name__ == "__main__":
    main()
