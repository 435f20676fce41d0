"""Turn a run into ``results/<date>.json``, ``results/latest.md`` and ``results/*.png``.

The JSON is the record (schema below); the Markdown and the plots are views of it,
so :func:`write` can redraw them from an old JSON file too::

    {
      "schema": 1, "date": ISO-8601, "mode": "quick" | "full", "command": str,
      "environment": {python, platform, cpu_count, cpu_model, memory_bytes, versions, ...},
      "datasets": {set: {size, count, bytes: {form: int}, page_cache: {...}}},
      "loaders":  [{contender, workload, label, unit, images_per_s: STAT, ...}],
      "sharing":  [{mode, label, trainers, images_per_s: STAT, server_cpu_s_per_1k: STAT,
                    memory_bytes: STAT, ...}],
      "external": {"pack", "receive", "over-memory": {...} | null},  the other benches' JSON
      "ratios":   {name: float},          computed from medians of this run only
      "targets":  [{name, value, target, met}],
      "errors":   [{what, error}]          contenders that could not run, and why
    }
    STAT = {median, min, max, values}
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

__all__ = ["SCHEMA", "across", "markdown", "plot", "ratios_and_targets", "write"]

SCHEMA = 1
GiB = 1 << 30


def _median(row: dict[str, Any] | None, key: str) -> float | None:
    if not row or not row.get(key):
        return None
    return float(row[key]["median"])


def _loader(report: dict[str, Any], contender: str, workload: str) -> dict[str, Any] | None:
    for row in report.get("loaders", []):
        if row["contender"] == contender and row["workload"] == workload:
            return dict(row)
    return None


def _sharing(report: dict[str, Any], mode: str, trainers: int) -> dict[str, Any] | None:
    for row in report.get("sharing", []):
        if row["mode"] == mode and row["trainers"] == trainers:
            return dict(row)
    return None


#: The one-trainer contenders each ratio and target is given for.
_TRANSPORTS = {
    "batchd_tcp": "TCP",
    "batchd_uds": "unix socket",
    "batchd_tcp_bytes": "TCP --no-shm",
}


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios_and_targets(
    report: dict[str, Any],
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Issue 6's ratios and targets, from this run's medians (None where a piece is missing)."""
    r: dict[str, float | None] = {}
    for wl in ("crop224_flip", "flip64"):
        c2 = _median(_loader(report, "dataloader_files", wl), "images_per_s")
        c3 = _median(_loader(report, "dataloader_memmap", wl), "images_per_s")
        for c, via in _TRANSPORTS.items():
            v = _median(_loader(report, c, wl), "images_per_s")
            r[f"{wl}: batchd {via} / DataLoader memmap"] = _ratio(v, c3)
            r[f"{wl}: batchd {via} / DataLoader files"] = _ratio(v, c2)
    enc = _median(_loader(report, "batchd_encoded", "crop224_flip"), "images_per_s")
    r["crop224_flip: batchd JPEG pack / DataLoader files"] = _ratio(
        enc, _median(_loader(report, "dataloader_files", "crop224_flip"), "images_per_s")
    )
    one = _sharing(report, "batchd_same", 1)
    four = _sharing(report, "batchd_same", 4)
    r["4 trainers same job: aggregate / one trainer"] = _ratio(
        _median(four, "images_per_s"), _median(one, "images_per_s")
    )
    r["4 trainers same job: server CPU per batch / one trainer"] = _ratio(
        _median(four, "server_cpu_s_per_1k"), _median(one, "server_cpu_s_per_1k")
    )
    seeds4 = _sharing(report, "batchd_seeds", 4)
    base4 = _sharing(report, "dataloader_cache", 4)
    r["4 trainers: memory batchd (seeds) / DataLoaders with byte cache"] = _ratio(
        _median(seeds4, "memory_bytes"), _median(base4, "memory_bytes")
    )
    pack_bytes = report.get("datasets", {}).get("s256", {}).get("bytes", {}).get("pack:img256")
    mem_limit = None if pack_bytes is None else pack_bytes * 1.1 + GiB
    seeds_mem = _median(seeds4, "memory_bytes")

    # bench_receive's JSON: {"results": {candidate: {"median_gbps", ...}}}; the target is
    # batchd's TCP transport against the raw TCP socket (same transport, fair ratio).
    received = ((report.get("external") or {}).get("receive") or {}).get("results") or {}
    gbps = (received.get("batchd-tcp") or {}).get("median_gbps")
    raw = (received.get("raw-socket") or {}).get("median_gbps")

    def target(name: str, value: float | None, goal: str, ok: bool | None) -> dict[str, Any]:
        return {"name": name, "value": value, "target": goal, "met": ok}

    def ge(v: float | None, x: float) -> bool | None:
        return None if v is None else v >= x

    def le(v: float | None, x: float | None) -> bool | None:
        return None if v is None or x is None else v <= x

    agg = r["4 trainers same job: aggregate / one trainer"]
    cpu = r["4 trainers same job: server CPU per batch / one trainer"]
    pack = (report.get("external") or {}).get("pack") or {}
    pack_rate = pack.get("batchd_images_per_s")
    targets = []
    for via in _TRANSPORTS.values():
        for other, goal in (("memmap", 1.0), ("files", 3.0)):
            v = r[f"crop224_flip: batchd {via} / DataLoader {other}"]
            name = f"batchd one trainer, {via}, vs DataLoader {other} (crop224)"
            targets.append(target(name, v, f">= {goal:g}x", ge(v, goal)))
    targets += [
        target("4 trainers same job: aggregate vs one", agg, ">= 2.5x", ge(agg, 2.5)),
        target("4 trainers same job: server CPU per batch vs one", cpu, "<= 0.3x", le(cpu, 0.3)),
        target(
            "4 trainers different seeds: total memory (bytes)",
            seeds_mem,
            "<= pack bytes x 1.1 + 1 GiB"
            + ("" if mem_limit is None else f" = {mem_limit / GiB:.2f} GiB"),
            le(seeds_mem, mem_limit),
        ),
        target("client receive, TCP, 38 MB bodies (GB/s)", gbps, ">= 2 GB/s", ge(gbps, 2.0)),
        target(
            "client receive vs raw socket",
            _ratio(gbps, raw),
            ">= 0.8x",
            ge(_ratio(gbps, raw), 0.8),
        ),
        # Issue 2's packing target, measured by bench_pack (contender 7).
        target("pack 64x64 PNG -> raw (images/s)", pack_rate, ">= 5,000", ge(pack_rate, 5000.0)),
    ]
    return r, targets


# --- Markdown ------------------------------------------------------------------------


def _fmt_rate(row: dict[str, Any] | None, key: str = "images_per_s") -> str:
    if not row or not row.get(key):
        return "n/a"
    s = row[key]
    return f"{s['median']:,.0f} ({s['min']:,.0f}-{s['max']:,.0f})"


def _fmt_num(v: float | None, spec: str = ".2f", suffix: str = "") -> str:
    return "n/a" if v is None else f"{v:{spec}}{suffix}"


def _gib(row: dict[str, Any] | None, key: str) -> str:
    v = _median(row, key)
    return "n/a" if v is None else f"{v / GiB:.2f}"


def _flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(obj, dict):
        out: list[tuple[str, Any]] = []
        for k, v in obj.items():
            out.extend(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list) and len(obj) <= 8 and all(not isinstance(x, dict | list) for x in obj):
        return [(prefix, ", ".join(str(x) for x in obj))]
    if isinstance(obj, list):
        out = []
        for i, v in enumerate(obj):
            out.extend(_flatten(v, f"{prefix}[{i}]"))
        return out
    return [(prefix, obj)]


def _fmt_target(v: float | None) -> str:
    return "n/a" if v is None else (f"{v / GiB:.2f} GiB" if v > 1e6 else f"{v:.2f}")


def across(reports: list[dict[str, Any]]) -> str:
    """Markdown: each target and one-trainer rate in every run, the median, runs that met it.

    Ratios are recomputed from each run's own medians (never mixed between runs), so
    old JSON files can be summarised too.
    """
    runs = sorted(reports, key=lambda r: str(r.get("date", "")))
    cols = " | ".join(f"run {i}" for i in range(1, len(runs) + 1))
    lines = ["# batchd benchmarks across runs", ""]
    for i, r in enumerate(runs, 1):
        load = ((r.get("environment") or {}).get("load_avg_at_start") or [None])[0]
        at_start = "?" if load is None else f"{load:.2f}"
        lines.append(f"- run {i}: {r.get('date')} ({r.get('mode')}), load average {at_start}")
    lines += ["", f"| target | goal | {cols} | median | met in |", "| --- | --- |"]
    lines[-1] += " ---: |" * (len(runs) + 1) + " ---: |"
    per_run = [ratios_and_targets(r)[1] for r in runs]
    for j, t in enumerate(per_run[0]):
        got = [ts[j] for ts in per_run]
        values = [g["value"] for g in got if g["value"] is not None]
        median = statistics.median(values) if values else None
        met = sum(g["met"] is True for g in got)
        shown = " | ".join(_fmt_target(g["value"]) for g in got)
        lines.append(
            f"| {t['name']} | {t['target']} | {shown} | {_fmt_target(median)} | "
            f"{met} of {len(runs)} |"
        )
    lines += ["", f"| one trainer, images/s | {cols} |", "| --- |" + " ---: |" * len(runs)]
    labels = {
        (row["workload"], row["contender"]): row["label"]
        for r in runs
        for row in r.get("loaders", [])
    }
    for (workload, contender), label in sorted(labels.items()):
        rates = [_median(_loader(r, contender, workload), "images_per_s") for r in runs]
        shown = " | ".join("n/a" if v is None else f"{v:,.0f}" for v in rates)
        lines.append(f"| {workload}: {label} | {shown} |")
    return "\n".join(lines) + "\n"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env.get("versions", {}).items() if v)
    lines = [
        f"# batchd benchmarks ({report['mode']} mode, {report['date']})",
        "",
        f"Machine: {env.get('cpu_model', env.get('machine', '?'))}, "
        f"{env.get('cpu_count')} CPUs, {env.get('memory_bytes', 0) / GiB:.1f} GiB RAM, "
        f"{env.get('platform')}; load average at start {env.get('load_avg_at_start')}.",
        f"Versions: python {env.get('python')}, {versions}.",
        f"Command: `{report.get('command', '')}`. Page cache: warm (one untimed warm-up pass "
        "before the timed ones). Images/s: median of the repeats (min-max).",
        "",
        "Datasets:",
        "",
    ]
    for key, ds in report.get("datasets", {}).items():
        sizes = ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in ds.get("bytes", {}).items())
        lines.append(f"- {key}: {ds['count']:,} images {ds['size']}x{ds['size']} RGB; {sizes}")
    for wl, title in (
        ("crop224_flip", "256x256 stored, random crop 224 + flip, batch 256"),
        ("flip64", "64x64 stored, flip only, batch 256"),
    ):
        rows = [r for r in report.get("loaders", []) if r["workload"] == wl]
        if not rows:
            continue
        c2 = _median(_loader(report, "dataloader_files", wl), "images_per_s")
        c3 = _median(_loader(report, "dataloader_memmap", wl), "images_per_s")
        lines += [
            "",
            f"## One trainer: {title}",
            "",
            "| contender | images/s | vs DataLoader memmap | vs DataLoader files |",
            "| --- | ---: | ---: | ---: |",
        ]
        for row in rows:
            m = _median(row, "images_per_s")
            lines.append(
                f"| {row['label']} | {_fmt_rate(row)} | {_fmt_num(_ratio(m, c3), '.2f', 'x')} "
                f"| {_fmt_num(_ratio(m, c2), '.2f', 'x')} |"
            )
    if report.get("sharing"):
        lines += [
            "",
            "## Sharing: concurrent trainers (256x256, crop 224 + flip)",
            "",
            "The server listens on a unix socket (bodies in shared memory). Memory: anonymous "
            "PSS of every process + the server's /dev/shm bodies + the dataset's page cache.",
            "",
            "| setup | trainers | aggregate images/s | server CPU s / 1k images "
            "| trainer CPU s / 1k images | memory GiB | of which server (PSS + shm) "
            "| of which page cache | sum of RSS GiB |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in report["sharing"]:
            lines.append(
                f"| {row['label']} | {row['trainers']} | {_fmt_rate(row)} "
                f"| {_fmt_num(_median(row, 'server_cpu_s_per_1k'), '.3f')} "
                f"| {_fmt_num(_median(row, 'trainer_cpu_s_per_1k'), '.3f')} "
                f"| {_gib(row, 'memory_bytes')} | {_gib(row, 'server_pss_bytes')} "
                f"| {_gib(row, 'page_cache_bytes')} | {_gib(row, 'rss_sum_bytes')} |"
            )
    for key, title in (
        ("pack", "Packing (contender 7)"),
        ("receive", "Client receive (contender 8)"),
        ("over-memory", "A pack bigger than the server's memory cgroup (medians)"),
    ):
        ext = report.get("external", {}).get(key)
        if ext is None:
            continue
        if key == "over-memory":
            ext = ext.get("summary", ext)  # the per-run figures stay in the JSON
        lines += ["", f"## {title}", "", "| key | value |", "| --- | --- |"]
        for k, v in _flatten(ext):
            shown = f"{v:,.3f}" if isinstance(v, float) else str(v)
            lines.append(f"| {k} | {shown} |")
    lines += ["", "## Targets (ratios within this run)", "", "| target | value | goal | met |"]
    lines.append("| --- | ---: | --- | --- |")
    for t in report.get("targets", []):
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['name']} | {_fmt_target(t['value'])} | {t['target']} | {met} |")
    if report.get("errors"):
        lines += ["", "## Not measured", ""]
        lines += [f"- {e['what']}: {e['error']}" for e in report["errors"]]
    plots = report.get("plots", [])
    if plots:
        lines += [""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    return "\n".join(lines) + "\n"


# --- plots ---------------------------------------------------------------------------


def plot(report: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bar charts of the loaders per workload and the sharing rates/memory; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    written: list[Path] = []
    loaders = report.get("loaders", [])
    workloads = [w for w in ("crop224_flip", "flip64") if any(r["workload"] == w for r in loaders)]
    if workloads:
        fig, axes = plt.subplots(
            1, len(workloads), figsize=(6.5 * len(workloads), 4.2), squeeze=False
        )
        for ax, wl in zip(axes[0], workloads, strict=True):
            rows = [r for r in loaders if r["workload"] == wl]
            med = [r["images_per_s"]["median"] for r in rows]
            err = [
                [m - r["images_per_s"]["min"] for m, r in zip(med, rows, strict=True)],
                [r["images_per_s"]["max"] - m for m, r in zip(med, rows, strict=True)],
            ]
            colors = [
                "tab:blue" if r["contender"].startswith("batchd") else "tab:gray" for r in rows
            ]
            ax.barh([r["label"] for r in rows], med, xerr=err, color=colors)
            ax.invert_yaxis()
            # "12k", not "12000": full numbers ran into each other on the narrow axes.
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v / 1000:g}k"))
            ax.set_xlabel("images/s (median, min-max)")
            ax.set_title(wl)
        fig.suptitle(f"One trainer, batch 256 ({report['environment'].get('cpu_count')} CPUs)")
        fig.tight_layout()
        path = out_dir / "loaders.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    sharing = report.get("sharing", [])
    if sharing:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
        for mode in dict.fromkeys(r["mode"] for r in sharing):
            rows = sorted((r for r in sharing if r["mode"] == mode), key=lambda r: r["trainers"])
            ks = [r["trainers"] for r in rows]
            ax1.plot(
                ks, [r["images_per_s"]["median"] for r in rows], marker="o", label=rows[0]["label"]
            )
            mem = [(r["memory_bytes"] or {}).get("median", 0) / GiB for r in rows]
            ax2.plot(ks, mem, marker="o", label=rows[0]["label"])
        ax1.set_xlabel("concurrent trainers")
        ax1.set_ylabel("aggregate images/s")
        ax2.set_xlabel("concurrent trainers")
        ax2.set_ylabel("GiB (PSS of all processes + page cache)")
        pack = report.get("datasets", {}).get("s256", {}).get("bytes", {}).get("pack:img256")
        if pack:
            ax2.axhline(pack / GiB, color="gray", linestyle=":", label="raw pack size")
        for ax in (ax1, ax2):
            ax.set_xticks(sorted({r["trainers"] for r in sharing}))
            ax.legend(fontsize=8)
            ax.grid(alpha=0.3)
        fig.suptitle("Several trainers on one machine (256x256, crop 224 + flip)")
        fig.tight_layout()
        path = out_dir / "sharing.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Fill ratios/targets, draw the plots, write the JSON and the Markdown; return their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    report["schema"] = SCHEMA
    report["ratios"], report["targets"] = ratios_and_targets(report)
    plots = plot(report, out_dir)
    report["plots"] = [p.name for p in plots]
    stamp = report["date"].replace(":", "").split(".")[0]
    json_path = out_dir / f"{stamp}.json"
    json_path.write_text(json.dumps(report, indent=1, sort_keys=False) + "\n")
    md_path = out_dir / "latest.md"
    md_path.write_text(markdown(report))
    return {"json": json_path, "markdown": md_path, **{p.stem: p for p in plots}}
