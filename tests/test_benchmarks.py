"""The benchmark harness runs end to end on a tiny size and writes what it promises.

Structure only: benchmarks are not tests, so no timing is ever asserted here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# The benchmarks package lives at the repository root, beside the installed packages.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from benchmarks import __main__ as bench_main  # noqa: E402
from benchmarks import _report  # noqa: E402
from benchmarks._data import ensure_packs, image, image_set  # noqa: E402
from benchmarks._harness import BenchConfig, BenchError, measure, page_cache_bytes  # noqa: E402


def _tiny(tmp_path: Path, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "mode": "quick",
        "n256": 24,
        "n64": 40,
        "batch_size": 8,
        "repeats": 3,
        "workers": 2,
        "sharing_trainers": (1, 2),
        "sharing_baseline_trainers": (1,),
        "pass_timeout_s": 60.0,
        "work_dir": tmp_path / "work",
        "results_dir": tmp_path / "results",
    }
    base.update(kw)
    return BenchConfig(**base)


def _check_stat(s: dict[str, Any], repeats: int, *, positive: bool = True) -> None:
    assert set(s) == {"median", "min", "max", "values"}
    assert len(s["values"]) == repeats
    assert s["min"] <= s["median"] <= s["max"]
    assert all((v > 0) if positive else (v >= 0) for v in s["values"])


def test_images_are_deterministic_and_every_form_holds_the_same_pixels(tmp_path: Path) -> None:
    a, la = image(7, 64)
    b, lb = image(7, 64)
    assert la == lb and np.array_equal(a, b)
    assert not np.array_equal(a, image(8, 64)[0])
    s = image_set(tmp_path, size=64, count=12)
    again = image_set(tmp_path, size=64, count=12)  # cached: not rebuilt
    assert again.root == s.root and (s.root / "complete.json").exists()
    assert all(f.exists() for f in s.files) and s.ext == "png"
    arr = np.load(s.array_path, mmap_mode="r")
    assert arr.shape == (12, 64, 64, 3) and arr.dtype == np.uint8
    # PNG is lossless: the array is the image itself.
    assert np.array_equal(arr[5], image(5, 64)[0])
    assert list(s.labels) == [image(i, 64)[1] for i in range(12)]
    ensure_packs(s)
    from batchd_server import open_dataset

    with open_dataset(s.pack_dir) as ds:
        assert ds.count == 12
        assert np.array_equal(ds.array("image")[5], arr[5])
        assert np.array_equal(ds.array("label"), s.labels)


def test_measure_reports_median_min_max_and_refuses_partial_epochs() -> None:
    m = measure(contender="c", workload="w", label="L", run_pass=lambda epoch: 100, repeats=3)
    d = m.as_dict()
    _check_stat(d["images_per_s"], 3)
    assert d["images_per_pass"] == 100 and "warm" in d["page_cache"]
    with pytest.raises(BenchError, match="not reading whole epochs"):
        measure(contender="c", workload="w", label="L", run_pass=lambda e: 10 + e, repeats=3)


def test_page_cache_bytes_counts_every_file(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a").write_bytes(b"x" * 10_000)
    (tmp_path / "b").write_bytes(b"")
    resident, total = page_cache_bytes([tmp_path / "d", tmp_path / "b"])
    assert total == 10_000
    assert 0 <= resident <= total


def test_a_tiny_run_writes_json_markdown_and_plots(tmp_path: Path) -> None:
    cfg = _tiny(tmp_path)
    only = ("dataloader_files", "dataloader_memmap", "batchd_tcp", "sharing")
    report = bench_main.run(cfg, only, "python -m benchmarks (test)")
    assert report["errors"] == []
    paths = _report.write(report, cfg.results_dir)

    saved = json.loads(paths["json"].read_text())
    assert saved["schema"] == _report.SCHEMA and saved["mode"] == "quick"
    env = saved["environment"]
    assert env["cpu_count"] >= 1 and env["versions"]["numpy"] == np.__version__
    assert {"torch", "cv2", "batchd"} <= set(env["versions"])
    assert set(saved["datasets"]) == {"s256", "s64"}
    assert saved["datasets"]["s256"]["count"] == 24
    assert saved["datasets"]["s256"]["bytes"]["pack:img256"] > 24 * 256 * 256 * 3

    pairs = {(r["contender"], r["workload"]) for r in saved["loaders"]}
    assert pairs == {
        (c, w)
        for c in ("dataloader_files", "dataloader_memmap", "batchd_tcp")
        for w in ("crop224_flip", "flip64")
    }
    for row in saved["loaders"]:
        _check_stat(row["images_per_s"], 3)
        assert row["images_per_pass"] == (24 if row["workload"] == "crop224_flip" else 40)

    modes = {(r["mode"], r["trainers"]) for r in saved["sharing"]}
    assert modes == {
        ("batchd_same", 1),
        ("batchd_same", 2),
        ("batchd_seeds", 1),
        ("batchd_seeds", 2),
        ("dataloader_cache", 1),
    }
    for row in saved["sharing"]:
        _check_stat(row["images_per_s"], 3)
        _check_stat(row["memory_bytes"], 3)
        assert row["images_per_pass"] == 24 * row["trainers"]
        if row["mode"].startswith("batchd"):
            # CPU clocks tick in 10 ms: a tiny pass can read as 0 s, never as negative.
            _check_stat(row["server_cpu_s_per_1k"], 3, positive=False)
        else:
            assert row["server_cpu_s_per_1k"] is None

    names = {t["name"] for t in saved["targets"]}
    assert any("DataLoader memmap" in n for n in names)
    assert all(t["met"] in (True, False, None) for t in saved["targets"])
    ratio = saved["ratios"]["crop224_flip: batchd TCP / DataLoader memmap"]
    rates = {
        r["contender"]: r["images_per_s"]["median"]
        for r in saved["loaders"]
        if r["workload"] == "crop224_flip"
    }
    assert ratio == pytest.approx(rates["batchd_tcp"] / rates["dataloader_memmap"])

    md = paths["markdown"].read_text()
    assert "## One trainer: 256x256 stored" in md and "## Sharing" in md
    assert "| DataLoader x2, np.memmap |" in md and "## Targets" in md
    assert "Page cache: warm" in md
    for name in ("loaders", "sharing"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({name}.png)" in md


def test_markdown_folds_in_the_other_benchmarks_and_names_failures() -> None:
    report: dict[str, Any] = {
        "date": "2024-01-01T00:00:00+00:00",
        "mode": "full",
        "environment": {"cpu_count": 2, "versions": {"numpy": "2"}},
        "datasets": {},
        "loaders": [],
        "sharing": [],
        "external": {
            "pack": {"batchd_images_per_s": 6000.0, "naive_images_per_s": 60.0},
            "receive": {
                "results": {
                    "raw-socket": {"median_gbps": 3.0},
                    "batchd-tcp": {"median_gbps": 2.7},
                }
            },
        },
        "errors": [{"what": "keras_files / flip64", "error": "ImportError: no keras"}],
    }
    ratios, targets = _report.ratios_and_targets(report)
    by_name = {t["name"]: t for t in targets}
    assert by_name["client receive vs raw socket"]["value"] == pytest.approx(0.9)
    assert by_name["client receive vs raw socket"]["met"] is True
    assert by_name["pack 64x64 PNG -> raw (images/s)"]["met"] is True
    assert by_name["batchd one trainer, TCP, vs DataLoader memmap (crop224)"]["met"] is None
    report["ratios"], report["targets"] = ratios, targets
    md = _report.markdown(report)
    assert "## Packing (contender 7)" in md and "| batchd_images_per_s | 6,000.000 |" in md
    assert "| results.batchd-tcp.median_gbps | 2.700 |" in md
    assert "keras_files / flip64: ImportError: no keras" in md


def test_unknown_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown benchmark names"):
        bench_main.run(_tiny(tmp_path), ("nope",))


def test_render_redraws_markdown_and_plots_from_a_saved_json(tmp_path: Path) -> None:
    report: dict[str, Any] = {
        "date": "2024-01-02T03:04:05+00:00",
        "mode": "full",
        "environment": {"cpu_count": 2, "versions": {}},
        "datasets": {},
        "loaders": [
            {
                "contender": c,
                "workload": "crop224_flip",
                "label": c,
                "images_per_s": {"median": v, "min": v, "max": v, "values": [v] * 3},
            }
            for c, v in (("batchd_tcp", 300.0), ("dataloader_memmap", 200.0))
        ],
        "sharing": [],
        "external": {},
        "errors": [],
    }
    saved = tmp_path / "old.json"
    saved.write_text(json.dumps(report))
    assert bench_main.main(["--render", str(saved)]) == 0
    md = (tmp_path / "latest.md").read_text()
    assert "| batchd_tcp | 300 (300-300) | 1.50x | n/a |" in md
    assert (tmp_path / "loaders.png").exists() and not (tmp_path / "sharing.png").exists()
    redone = json.loads((tmp_path / "2024-01-02T030405+0000.json").read_text())
    assert redone["ratios"]["crop224_flip: batchd TCP / DataLoader memmap"] == pytest.approx(1.5)


def test_resnet18_has_torchvisions_parameter_count() -> None:
    from benchmarks.bench_e2e import resnet18

    model = resnet18(1000)
    # torchvision.models.resnet18(): 11,689,512 parameters (its model card).
    assert sum(p.numel() for p in model.parameters()) == 11_689_512


def test_e2e_trains_from_every_feeder_on_the_cpu(tmp_path: Path) -> None:
    from benchmarks import bench_e2e

    args = bench_e2e.parse_args(
        [
            *("--device", "cpu", "--count", "24", "--size", "40", "--crop", "32"),
            *("--batch-size", "8", "--steps", "2", "--warmup", "1", "--repeats", "2"),
            *("--workers", "1", "--work-dir", str(tmp_path / "work")),
        ]
    )
    record = bench_e2e.run(args)
    assert record["errors"] == []
    assert list(record["feeders"]) == list(bench_e2e.FEEDERS)
    for res in record["feeders"].values():
        _check_stat(res["steps_per_s"], 2)
        assert np.isfinite(res["last_loss"])
        assert res["busy_share"] is None  # not a meaningful figure on the CPU
    with pytest.raises(SystemExit):
        bench_e2e.parse_args(["--feeders", "synthetic,nope"])


def test_across_gives_every_run_the_median_and_how_many_runs_met_each_target(
    tmp_path: Path,
) -> None:
    def run(date: str, tcp: float, memmap: float) -> dict[str, Any]:
        rows = (("batchd_tcp", tcp), ("dataloader_memmap", memmap))
        return {
            "date": date,
            "mode": "full",
            "environment": {"load_avg_at_start": [0.5]},
            "loaders": [
                {
                    "contender": c,
                    "workload": "crop224_flip",
                    "label": c,
                    "images_per_s": {"median": v, "min": v, "max": v, "values": [v]},
                }
                for c, v in rows
            ],
        }

    # Given out of date order: the summary sorts the runs by date.
    reports = [run("2024-01-03", 90, 100), run("2024-01-01", 120, 100), run("2024-01-02", 110, 100)]
    paths = []
    for i, r in enumerate(reports):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(r))
    assert bench_main.main(["--across", *map(str, paths)]) == 0
    md = _report.across(reports)
    row = next(
        x
        for x in md.splitlines()
        if x.startswith("| batchd one trainer, TCP, vs DataLoader memmap")
    )
    assert row.endswith("| >= 1x | 1.20 | 1.10 | 0.90 | 1.10 | 2 of 3 |")
    assert "| crop224_flip: batchd_tcp | 120 | 110 | 90 |" in md
    assert "- run 1: 2024-01-01 (full), load average 0.50" in md
