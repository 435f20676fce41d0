"""``python -m benchmarks [--quick] [--only NAME,...] [--json]``: every contender, one run.

``--render JSON`` redraws the Markdown and plots of a saved run; ``--across JSON...``
summarises several runs (each target per run, its median, how many runs met it).

Generates the data (cached under ``benchmarks/_work/``), runs the loaders (contenders
1-5), the sharing benchmark (6), and the packing (7) and receive-path (8) benchmarks
as subprocesses, then writes ``benchmarks/results/<date>.json``, ``latest.md`` and
the plots. ``--json`` also prints the JSON record on stdout. A contender that fails
is recorded under ``errors`` with its message and the run goes on.
"""

from __future__ import annotations

import os

# Keras reads its backend once, at import: pin it before anything imports keras.
os.environ.setdefault("KERAS_BACKEND", "torch")

import argparse
import datetime as dt
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from . import _report, bench_loaders, bench_sharing
from ._data import ImageSet, image_set
from ._harness import BenchConfig, deadline, environment, page_cache_bytes

__all__ = ["ALL", "FULL", "QUICK", "main", "run"]

QUICK = BenchConfig(mode="quick", n256=1024, n64=4096, sharing_trainers=(1, 2, 4))
FULL = BenchConfig(
    mode="full",
    n256=20_000,
    n64=50_000,
    sharing_trainers=(1, 2, 4),
    sharing_baseline_trainers=(1, 2, 4),
)

#: Everything ``--only`` accepts, in run order.
ALL: tuple[str, ...] = (
    *bench_loaders.CONTENDERS,
    "sharing",
    "pack",
    "receive",
    "over-memory",
)


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _external(module: str, args: list[str], timeout_s: float) -> dict[str, Any]:
    """Run ``python -m benchmarks.<module> --json ARGS`` and parse its stdout."""
    cmd = [sys.executable, "-m", f"benchmarks.{module}", "--json", *args]
    root = Path(__file__).resolve().parent.parent
    try:
        done = subprocess.run(
            cmd, cwd=root, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"{' '.join(cmd)} ran past {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-1500:]}"
        )
    try:
        parsed = json.loads(done.stdout)
    except json.JSONDecodeError as exc:
        raise RuntimeError(f"{' '.join(cmd)} printed no JSON: {done.stdout[-500:]!r}") from exc
    if not isinstance(parsed, dict):
        raise RuntimeError(f"{' '.join(cmd)} printed {type(parsed).__name__}, not a JSON object")
    return parsed


def _dataset_record(images: ImageSet, key: str) -> dict[str, Any]:
    resident, total = page_cache_bytes([images.root])
    return {
        "key": key,
        "size": images.size,
        "count": images.count,
        "file_format": images.ext,
        "bytes": images.sizes(),
        "page_cache_after_run": {"resident_bytes": resident, "total_bytes": total},
    }


def run(cfg: BenchConfig, only: tuple[str, ...] = ALL, command: str = "") -> dict[str, Any]:
    """Run the selected contenders and return the report (not yet written)."""
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        raise ValueError(f"unknown benchmark names {unknown}; known: {', '.join(ALL)}")
    report: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "mode": cfg.mode,
        "command": command,
        "config": {
            "n256": cfg.n256,
            "n64": cfg.n64,
            "batch_size": cfg.batch_size,
            "repeats": cfg.repeats,
            "workers": cfg.workers,
            "sharing_trainers": list(cfg.sharing_trainers),
            "sharing_baseline_trainers": list(cfg.sharing_baseline_trainers),
        },
        "environment": environment(),
        "datasets": {},
        "loaders": [],
        "sharing": [],
        "external": {"pack": None, "receive": None, "over-memory": None},
        "errors": [],
    }
    sets: dict[int, ImageSet] = {}

    def images_for(size: int) -> ImageSet:
        if size not in sets:
            count = cfg.n256 if size == 256 else cfg.n64
            _log(f"dataset {size}x{size} x {count:,} (generated once, cached in {cfg.work_dir})")
            sets[size] = image_set(cfg.work_dir, size=size, count=count)
        return sets[size]

    def failed(what: str, exc: BaseException) -> None:
        _log(f"{what} FAILED: {exc}")
        traceback.print_exc(file=sys.stderr)
        report["errors"].append({"what": what, "error": f"{type(exc).__name__}: {exc}"})

    for contender in (c for c in bench_loaders.CONTENDERS if c in only):
        for wl in bench_loaders.WORKLOADS:
            what = f"{contender} / {wl.name}"
            try:
                images = images_for(wl.size)
                with deadline(cfg.pass_timeout_s * (cfg.repeats + 1) + 120, what):
                    for m in bench_loaders.run(contender, wl, images, cfg):
                        s = m.images_per_s
                        _log(f"{what}: {s.median:,.0f} images/s ({s.min:,.0f}-{s.max:,.0f})")
                        report["loaders"].append(m.as_dict())
            except Exception as exc:  # one broken contender must not lose the others
                failed(what, exc)
    if "sharing" in only:
        try:
            images = images_for(256)
            limit = cfg.pass_timeout_s * (cfg.repeats + 1) * 9 + 300
            with deadline(limit, "sharing"):
                for row in bench_sharing.run(images, cfg):
                    _log(
                        f"sharing {row['mode']} x{row['trainers']}: "
                        f"{row['images_per_s']['median']:,.0f} images/s"
                    )
                    report["sharing"].append(row)
        except Exception as exc:
            failed("sharing", exc)
    quick = cfg.mode == "quick"
    for name, module, args in (
        ("pack", "bench_pack", ["--quick"] if quick else []),
        ("receive", "bench_receive", ["--reps", "5"] if quick else []),
        # A pack 2.5x the server's memory cgroup (skips, saying why, where none can be made).
        (
            "over-memory",
            "bench_overmem",
            ["--count", "4000", "--seconds", "8", "--packs", "raw"]
            if quick
            else ["--count", "20000", "--reps", "3"],
        ),
    ):
        if name in only:
            _log(f"{module} (subprocess)")
            try:
                report["external"][name] = _external(module, args, 900)
            except Exception as exc:
                failed(name, exc)
    for size, images in sorted(sets.items(), reverse=True):
        report["datasets"][f"s{size}"] = _dataset_record(images, f"s{size}")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="batchd against the loaders users write."
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes: the whole run in under 3 minutes"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(ALL)}")
    parser.add_argument("--json", action="store_true", help="also print the JSON record")
    parser.add_argument(
        "--render",
        metavar="JSON",
        type=Path,
        help="measure nothing: redraw latest.md and the plots from a results JSON",
    )
    parser.add_argument(
        "--across",
        metavar="JSON",
        type=Path,
        nargs="+",
        help="measure nothing: print each target in every given run, its median and how "
        "many runs met it",
    )
    args = parser.parse_args(argv)
    if args.across:
        print(_report.across([json.loads(p.read_text()) for p in args.across]), end="")
        return 0
    if args.render is not None:
        old = json.loads(args.render.read_text())
        paths = _report.write(old, args.render.parent)
        print(paths["markdown"].read_text())
        return 0
    cfg = QUICK if args.quick else FULL
    only = tuple(n.strip() for n in args.only.split(",") if n.strip()) or ALL
    command = "python -m benchmarks " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        report = run(cfg, only, command.strip())
    except ValueError as exc:
        parser.error(str(exc))
    paths = _report.write(report, cfg.results_dir)
    _log("wrote " + ", ".join(str(p) for p in paths.values()))
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(paths["markdown"].read_text())
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
