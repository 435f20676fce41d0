"""``batchd top``: the status page's figures in a terminal, refreshed every second.

It reads ``GET /v1/status`` with :func:`batchd.server_status` (so it takes the same
URLs, unix sockets and ``BATCHD_TOKEN`` as a trainer) and prints three plain tables:
live jobs, datasets, server. Nothing here imports the server's heavy dependencies.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from ..progress import human_bytes

__all__ = ["render", "top"]

_BARS = " ▁▂▃▄▅▆▇█"


def _bytes(n: int | None) -> str:
    return "-" if n is None else human_bytes(n)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    t = round(s)
    h, m, r = t // 3600, t % 3600 // 60, t % 60
    return f"{h}h {m}m" if h else f"{m}m {r}s" if m else f"{r}s"


def _spark(values: Sequence[float], width: int = 20) -> str:
    tail = list(values)[-width:]
    top = max(tail, default=0) or 1
    return "".join(_BARS[min(8, round(v / top * 8))] for v in tail)


def _table(head: Sequence[str], rows: Sequence[Sequence[str]], right: set[int]) -> list[str]:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(head), *(line(r) for r in rows)]


def _pack_row(d: dict[str, Any]) -> list[str]:
    if not d["available"]:
        return [d["name"], *["-"] * 7, f"unavailable: {d['error']}"]
    size, fingerprint = _bytes(d["bytes"]), d["fingerprint"][:12]
    return [
        d["name"],
        f"{d['count']:,}",
        size,
        d["storage"],
        fingerprint,
        _pct(d["resident"]),
        _pct(d["read_hit_rate"]),
        f"{d['read_wait_s']:.1f} s",
        d["reads"],
    ]


def render(doc: dict[str, Any]) -> str:
    """One frame of ``batchd top`` for a ``/v1/status`` document."""
    s = doc["server"]
    out = [
        f"batchd {doc['version']}  up {_dur(s['uptime_s'])}  CPU {s['cpu_percent']:.0f}% of "
        f"{s['cores']} cores  queued {s['queued']}  computing {s['inflight']}  "
        f"read-ahead {s['readahead_running']}/{s['readahead_depth']}  cache "
        f"{_bytes(s['cache_bytes'])} (hit {_pct(s['cache_hit_rate'])})  "
        f"served {s['batches_served']:,}  4xx {s['responses_4xx']}  5xx {s['responses_5xx']}",
        "",
    ]
    jobs = [
        [
            j["dataset"],
            str(j["seed"]),
            str(j["batch_size"]),
            j["split"] or "all",
            f"{j['rank']}/{j['world_size']}",
            str(j["epoch"]),
            f"{j['batch'] + 1}/{j['num_batches']}",
            f"{j['images_per_s']:,.0f}",
            _dur(j["eta_s"]),
            str(j["trainers"]),
            _pct(j["stall"]),
            _spark(j["sparkline"]),
        ]
        for j in doc["jobs"]
    ]
    head = ["JOB", "SEED", "BATCH", "SPLIT", "RANK", "EPOCH", "K/N", "IMG/S", "ETA", "TRAINERS"]
    out += _table([*head, "STALL", "LAST 100 S"], jobs, {1, 2, 5, 6, 7, 8, 9, 10})
    if not jobs:
        out.append("(no job asked for a batch in the last minute)")
    out.append("")
    packs = [_pack_row(d) for d in doc["datasets"]]
    cols = "DATASET SAMPLES SIZE STORAGE FINGERPRINT IN_MEMORY READ_HITS IO_WAIT READS"
    out += _table(
        [c.replace("_", " ") for c in cols.split()],
        packs,
        {1, 2, 5, 6, 7},
    )
    return "\n".join(out)


@click.command("top")
@click.option(
    "--url",
    "urls",
    multiple=True,
    default=("http://127.0.0.1:8470",),
    show_default=True,
    help="The server (http://HOST:PORT or unix:///path/to.sock); repeat for replicas.",
)
@click.option(
    "--token",
    envvar="BATCHD_TOKEN",
    help="The server's token (default: $BATCHD_TOKEN).",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=1.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option("--once", is_flag=True, help="Print one frame and exit (for scripts).")
@click.option("--json", "as_json", is_flag=True, help="Print the /v1/status JSON instead.")
def top(
    urls: tuple[str, ...], token: str | None, interval: float, once: bool, as_json: bool
) -> None:
    """Live jobs, datasets and load of a running server, in the terminal (Ctrl-C quits)."""
    from batchd import TransportError, server_status

    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                doc = server_status(list(urls), token=token)
                frame = json.dumps(doc, indent=2) if as_json else render(doc)
            except TransportError as exc:
                if once:
                    raise
                frame = f"batchd top: no answer ({exc}); retrying every {interval:g} s"
            if tty and not once:
                frame = "\x1b[H\x1b[2J" + frame  # home and clear: redraw in place
            click.echo(frame)
            if once:
                return
            time.sleep(interval)
            if not tty:
                click.echo("")
    except KeyboardInterrupt:
        return
