"""``python -m benchmarks.reliability``: run the reliability group, write docs/reliability.md.

One command: runs ``pytest -m reliability tests/reliability`` with the figures file
pointed at ``benchmarks/results/reliability.json``, measures what reading samples with
``pread`` instead of through the memory map costs (the SIGBUS fix; engine in-process,
256x256 crop + flip), and regenerates ``docs/reliability.md`` from both.

    python -m benchmarks.reliability                   # the CI sizes (~3-4 min on 2 cores)
    python -m benchmarks.reliability --long            # 50 kills, a 3-minute soak, 300 examples
    python -m benchmarks.reliability --kills 30 --soak-seconds 120
    python -m benchmarks.reliability --from-json F     # only rewrite the doc from figures F

The tests assert correctness; every number in the doc is a measurement of this run.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["main", "measure_pread_cost", "render"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"
DOC = ROOT / "docs" / "reliability.md"
BENCH_PACK = ROOT / "benchmarks" / "_work" / "s256-n1024-v1" / "data" / "img256"
CROP_FLIP = '[{"op":"random_crop","size":224},{"op":"hflip"}]'


# --------------------------------------------------------------------------- pread cost


@contextmanager
def _memmap_reads() -> Iterator[None]:
    """Samples read through the memory map, as the server does while it holds a read lease."""
    from batchd_server.format import Dataset

    rows, row = Dataset.read_rows, Dataset.read_row

    def mm_rows(self: Dataset, name: str, ids: Any, out: Any) -> None:
        np.take(self.array(name), ids, axis=0, out=out, mode="clip")

    def mm_row(self: Dataset, name: str, i: int, out: Any = None) -> Any:
        return self.array(name)[i]

    Dataset.read_rows, Dataset.read_row = mm_rows, mm_row  # type: ignore[method-assign]
    try:
        yield
    finally:
        Dataset.read_rows, Dataset.read_row = rows, row  # type: ignore[method-assign]


def _pack_256(tmp: Path) -> tuple[Path, str]:
    if (BENCH_PACK / "batchd.header").exists():
        return BENCH_PACK.parent, BENCH_PACK.name
    from batchd_server.pack import pack_arrays

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (512, 256, 256, 3), dtype=np.uint8)
    pack_arrays(tmp / "img256", {"image": images, "label": np.arange(512)}, progress=False)
    return tmp, "img256"


def _epoch_rate(root: Path, name: str, augment: str, threads: int, epoch: int) -> float:
    from batchd_server.serve.engine import Engine, EngineConfig
    from batchd_server.serve.registry import Registry
    from batchd_server.serve.request import BatchRequest

    async def run() -> float:
        eng = Engine(Registry(root), EngineConfig(threads=threads, cache_bytes=0, readahead=0))
        try:
            count = int((await eng.info(name))["count"])
            batches = count // 64
            t0 = time.perf_counter()
            for k in range(batches):
                await eng.batch(
                    BatchRequest(dataset=name, k=k, batch_size=64, epoch=epoch, augment=augment)
                )
            return float(batches * 64 / (time.perf_counter() - t0))
        finally:
            eng.close()

    return asyncio.run(run())


def measure_pread_cost(rounds: int = 5) -> dict[str, Any]:
    """Samples/s through the engine, memory map vs pread, interleaved, best of ``rounds``."""
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root, name = _pack_256(Path(tmp))
        for label, augment in (("gather (no ops)", "[]"), ("random_crop 224 + hflip", CROP_FLIP)):
            for threads in (1, 2):
                best = {"mmap": 0.0, "pread": 0.0}
                _epoch_rate(root, name, augment, threads, 0)  # warm the page cache
                for r in range(rounds):
                    for way in ("mmap", "pread"):
                        if way == "mmap":
                            with _memmap_reads():
                                rate = _epoch_rate(root, name, augment, threads, r + 1)
                        else:
                            rate = _epoch_rate(root, name, augment, threads, r + 1)
                        best[way] = max(best[way], rate)
                out[f"{label}, {threads} thread{'s' if threads > 1 else ''}"] = {
                    "mmap_samples_per_s": round(best["mmap"]),
                    "pread_samples_per_s": round(best["pread"]),
                    "change_pct": round(100 * (best["pread"] / best["mmap"] - 1), 1),
                }
    return out


# --------------------------------------------------------------------------- the doc


def _s(d: dict[str, Any] | None) -> str:
    if not d or not d.get("n"):
        return "-"
    return f"{d['p50']:.2f} s / {d['max']:.2f} s"


def _answers(d: dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(d.items()))


def render(fig: dict[str, Any]) -> str:
    """docs/reliability.md from the figures JSON (missing sections show as '-')."""
    g: Callable[[str], dict[str, Any]] = lambda k: fig.get(k) or {}  # noqa: E731
    k, fo, ck, sl = g("sigkill"), g("failover"), g("client_killed"), g("slowloris")
    st, rp, tr = g("sigterm"), g("pack_replaced"), g("pack_truncated")
    tm = g("pack_truncated_mapped")
    cp, pt, tok, par = g("corrupt_packs"), g("path_traversal"), g("tokens"), g("parameters")
    nf, ov, sc, so, ol = (
        g("non_finite_augment"),
        g("oversized"),
        g("schemathesis"),
        g("soak"),
        g("overload"),
    )
    meta = g("meta")
    lines = [
        "# Reliability",
        "",
        "What `pytest -m reliability` (tests/reliability/) proves, with the figures it measured.",
        "Regenerate with `python -m benchmarks.reliability` (CI sizes) or `--long`; the tests",
        "assert correctness, the numbers below are measurements of one run, not thresholds.",
        "",
        f"Run: {meta.get('date', '-')}, {meta.get('machine', '-')}, "
        f"`{meta.get('command', '-')}` ({meta.get('seconds', '-')} s, "
        f"exit {meta.get('exit', '-')}).",
        "",
        "## Faults",
        "",
        "| fault | result |",
        "| --- | --- |",
        f"| SIGKILL mid-epoch, restarted at once | **{k.get('kills', '-')} kills survived** "
        f"({k.get('kills_mid_body', '-')} timed mid-body, "
        f"{k.get('bodies_cut_short', '-')} bodies cut short); "
        f"{k.get('epochs', '-')} (epoch, rank) runs, {k.get('batches_checked', '-')} batches, "
        f"**{k.get('samples_checked', '-')} samples checked: {k.get('lost', '-')} lost, "
        f"{k.get('duplicated', '-')} duplicated, "
        f"{k.get('bytes_mismatched', '-')} batches differing** "
        "from an uninterrupted reference run |",
        f"| recovery (kill → next batch delivered), p50 / max | {_s(k.get('recovery_s'))} "
        f"(restart alone: {_s(k.get('restart_s'))}) |",
        f"| retries per client over the kill run | {_answers(k.get('retries_per_client', {}))} |",
        f"| SIGTERM with {st.get('in_flight', '-')} requests in flight | "
        f"{st.get('completed', '-')} completed "
        f"byte-identical; exited after {st.get('exit_s', '-')} s (grace 10 s) |",
        f"| 2 replicas, one SIGKILLed mid-epoch | {fo.get('samples_checked', '-')} samples: "
        f"{fo.get('lost', '-')} lost, {fo.get('duplicated', '-')} duplicated; "
        f"{fo.get('retries', '-')} retries, next batch after {fo.get('failover_gap_s', '-')} s |",
        f"| {ck.get('clients_killed', '-')} clients SIGKILLed mid-download "
        f"({ck.get('body_mb', '-')} MB bodies) "
        f"| server fds {ck.get('fds_before', '-')} → {ck.get('fds_after', '-')}, "
        f"RSS +{ck.get('rss_growth_mb', '-')} MB; next request byte-identical |",
        f"| pack replaced (atomic repack) {rp.get('replacements', '-')} times under load | "
        f"{_answers(rp.get('outcomes', {}))} (`200 0`/`200 1`: old/new pack); "
        f"{rp.get('mixed_bodies', '-')} mixed bodies; "
        f"other dataset {rp.get('other_dataset_ok', '-')} x 200 |",
        f"| data file truncated in place {tr.get('truncations', '-')} times under load, "
        "plain gather | "
        f"{_answers(tr.get('outcomes', {}))}; "
        f"**{tr.get('server_deaths', '-')} server deaths (no SIGBUS)**; "
        f"other dataset {tr.get('other_dataset_ok', '-')} x 200 |",
        f"| the same, {tm.get('truncations', '-')} times, crop 40 + flip pipeline | "
        f"{_answers(tm.get('outcomes', {}))}; every 200 equal to the pipeline run on the "
        f"intact images; **{tm.get('server_deaths', '-')} server deaths** |",
        "",
        "## Bad input",
        "",
        "| class | tried | result |",
        "| --- | --- | --- |",
        f"| corrupt packs ({cp.get('classes', '-')} classes: {', '.join(cp.get('names', []))}) "
        f"| {cp.get('classes', '-')} | "
        f"{cp.get('typed_errors', '-')} typed `FormatError`s naming the file, "
        f"{cp.get('crashes', '-')} crashes; "
        f"the server skipped {cp.get('skipped_by_server', '-')} with a logged "
        "reason and served the rest "
        f"({', '.join(cp.get('only_verify_detects', [])) or '-'}: found by "
        "`batchd verify`, not at open) |",
        "| path traversal (`..`, `%2e%2e%2f`, absolute, NUL, 4 KB names, "
        "symlinks out of the root) "
        f"| {pt.get('tried', '-')} | {_answers(pt.get('answers', {}))}; "
        f"{pt.get('server_errors', '-')} 5xx |",
        f"| bearer tokens (missing, empty, wrong, non-ASCII, 8 KB) x 6 routes | "
        f"{tok.get('tried', '-')} "
        f"| {tok.get('unauthorized_401', '-')} x 401, "
        f"{tok.get('server_errors', '-')} 5xx; `hmac.compare_digest` |",
        f"| huge, negative, malformed parameters | {par.get('tried', '-')} | "
        f"{_answers(par.get('answers', {}))} |",
        f"| NaN / ±inf / 1e999 in every op parameter | {nf.get('tried', '-')} | "
        f"{_answers(nf.get('answers', {}))} |",
        f"| oversized headers, URLs, bodies, garbage | {ov.get('tried', '-')} | "
        f"{_answers(ov.get('answers', {}))} (0 = connection closed) |",
        f"| slowloris: {sl.get('slow_connections', '-')} connections dribbling a head | - | "
        f"dropped after {_s(sl.get('dropped_after_s'))} "
        f"(p50/max; `--header-timeout` {sl.get('header_timeout_s', '-')} s); "
        f"meanwhile {sl.get('others_served', '-')} other requests served, "
        f"latency {_s(sl.get('others_latency_s'))} |",
        f"| schemathesis over /openapi.json ({sc.get('examples_per_operation', '-')} examples per "
        f"operation and mode) | {sc.get('requests', '-')} | "
        f"{sc.get('server_errors', '-')} server errors, "
        f"{sc.get('schema_violations', '-')} schema violations |",
        f"| bind | - | default {g('binding').get('default_host', '-')}; "
        "a public host without a token: "
        f"{g('binding').get('public_without_token', '-')} |",
        "",
        "## Load",
        "",
        "| | |",
        "| --- | --- |",
        f"| soak | {so.get('clients', '-')} clients, {so.get('datasets', '-')} datasets, "
        f"{so.get('seconds', '-')} s: "
        f"{so.get('batches', '-')} batches ({so.get('batches_per_s', '-')}/s), "
        f"{so.get('epochs', '-')} epochs, "
        f"**{so.get('errors', '-')} errors** |",
        f"| after warm-up | RSS {so.get('rss_mb_after_warmup', '-')} MB, "
        f"growth {so.get('rss_growth_mb', '-')} MB "
        f"(max {so.get('rss_max_growth_mb', '-')}); fds {so.get('fds_after_warmup', '-')} → max "
        f"{so.get('fds_max', '-')}; threads {so.get('threads_after_warmup', '-')} "
        f"→ max {so.get('threads_max', '-')} |",
        f"| overload (`--max-inflight {ol.get('max_inflight', '-')}`, "
        f"{ol.get('clients', '-')} clients) | "
        f"{ol.get('answered_503', '-')} of {ol.get('requests', '-')} answers "
        "were 503 + Retry-After; "
        f"clients waited {_s(ol.get('retry_wait_s'))} before retrying; "
        f"{ol.get('network_errors', '-')} timeouts; "
        f"retries per client {ol.get('retries_per_client', '-')} |",
        "",
    ]
    cost = fig.get("pread_cost")
    if cost:
        lines += [
            "## The SIGBUS fix and its cost",
            "",
            "A pack truncated while a batch was gathered from its memory map killed the server",
            "(SIGBUS). The server now reads a mapping only while it holds a read lease on the",
            "pack's files (`batchd_server/lease.py`): a process that opens one for writing or",
            "truncates it blocks until the server has stopped reading the mapping and given the",
            "lease up. Without a lease (files of another user, NFS, a writer already there,",
            "`--no-leases`) samples are read with `os.preadv` into the server's own buffers: a",
            "short read is a `StaleError`, the pack is re-opened and the batch retried once. What",
            "that fallback costs, engine in-process, 256x256 RGB, batches of 64, best of several",
            "epochs (this shared 2-core machine is noisy: read differences of a few % as noise):",
            "",
            "| workload | mmap samples/s | pread samples/s | change |",
            "| --- | --- | --- | --- |",
        ]
        for label, row in cost.items():
            lines.append(
                f"| {label} | {row['mmap_samples_per_s']} | {row['pread_samples_per_s']} | "
                f"{row['change_pct']:+.1f}% |"
            )
        lines.append("")
    lines += [
        "## Knobs",
        "",
        "`BATCHD_KILLS` (default 20), `BATCHD_SOAK_SECONDS` (45), `BATCHD_FUZZ_EXAMPLES` (150),",
        "`BATCHD_RELIABILITY_OUT` (where the tests write the figures JSON).",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.reliability", description=__doc__)
    ap.add_argument("--kills", type=int, default=None, help="SIGKILLs in the kill test (20)")
    ap.add_argument("--soak-seconds", type=int, default=None, help="soak duration (45)")
    ap.add_argument("--fuzz-examples", type=int, default=None, help="schemathesis examples (150)")
    ap.add_argument("--long", action="store_true", help="50 kills, 180 s soak, 300 examples")
    ap.add_argument("--skip-cost", action="store_true", help="do not measure mmap vs pread")
    ap.add_argument("--from-json", type=Path, default=None, help="only render the doc from F")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"figures JSON ({RESULTS})")
    args = ap.parse_args(argv)

    if args.from_json is not None:
        DOC.write_text(render(json.loads(args.from_json.read_text())))
        print(f"wrote {DOC}")
        return 0
    env = dict(os.environ, BATCHD_RELIABILITY_OUT=str(args.out), KERAS_BACKEND="torch")
    for flag, var, long in (
        (args.kills, "BATCHD_KILLS", 50),
        (args.soak_seconds, "BATCHD_SOAK_SECONDS", 180),
        (args.fuzz_examples, "BATCHD_FUZZ_EXAMPLES", 300),
    ):
        if flag is not None:
            env[var] = str(flag)
        elif args.long:
            env[var] = str(long)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.unlink(missing_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "reliability",
        "tests/reliability",
        "-q",
        "-p",
        "no:cacheprovider",
    ]
    if "BATCHD_SOAK_SECONDS" in env and int(env["BATCHD_SOAK_SECONDS"]) > 200:
        cmd += ["--timeout", str(int(env["BATCHD_SOAK_SECONDS"]) + 300)]
    t0 = time.monotonic()
    rc = subprocess.call(cmd, cwd=ROOT, env=env)
    seconds = round(time.monotonic() - t0)
    fig: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    knobs = " ".join(
        f"{v}={env[v]}"
        for v in ("BATCHD_KILLS", "BATCHD_SOAK_SECONDS", "BATCHD_FUZZ_EXAMPLES")
        if v in env
    )
    fig["meta"] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "command": (knobs + " " if knobs else "") + "pytest -m reliability",
        "seconds": seconds,
        "exit": rc,
    }
    if not args.skip_cost:
        fig["pread_cost"] = measure_pread_cost()
    args.out.write_text(json.dumps(fig, indent=1, sort_keys=True))
    DOC.write_text(render(fig))
    print(f"pytest exit {rc} in {seconds} s; wrote {args.out} and {DOC}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
