"""The status page (``GET /``) and its login form: self-contained HTML, no CDN, no build.

The page renders only from ``GET /v1/status``, polled once a second. Every value is
put into the DOM with ``textContent``, never as HTML, so a dataset or pipeline name
cannot inject markup. The sparkline is an inline SVG polyline.
"""

from __future__ import annotations

import html

__all__ = ["login_page", "status_page"]

# In _STYLE and _SCRIPT a backslash at the end of a line joins it to the next in the
# produced text (Python drops the backslash and the newline): a long CSS or JS line
# stays one line on the page while the source keeps within 100 columns.
_STYLE = """
:root { --fg:#1d2430; --mute:#697386; --line:#e3e8ee; --bg:#f7f9fb; --ok:#1a7f37;
        --warn:#b35900; --bad:#c62828; --accent:#2f6fde; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
       color: var(--fg); background: var(--bg); }
header { display:flex; align-items:baseline; gap:1rem; padding:.8rem 1.4rem;
         background:#fff; border-bottom:1px solid var(--line); }
header h1 { font-size:1.15rem; margin:0; }
#state { font-size:.8rem; color:var(--mute); }
#state.live::before { content:"\\25CF "; color:var(--ok); }
#state.offline::before { content:"\\25CF "; color:var(--bad); }
main { padding: 1rem 1.4rem; max-width: 1400px; }
section { background:#fff; border:1px solid var(--line); border-radius:6px;
          margin-bottom:1rem; padding:.6rem .9rem; }
h2 { font-size:.95rem; margin:.2rem 0 .5rem; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align:left; padding:.3rem .6rem .3rem 0; border-bottom:1px solid var(--line);
         white-space:nowrap; vertical-align:middle; }
th { color:var(--mute); font-weight:500; font-size:.8rem; }
td.num, th.num { text-align:right; font-variant-numeric: tabular-nums; }
td.aug { max-width: 18rem; overflow:hidden; text-overflow:ellipsis; color:var(--mute); }
.empty { color:var(--mute); padding:.4rem 0; }
.bar { display:inline-block; width:7rem; height:.5rem; background:var(--line);
       border-radius:3px; vertical-align:middle; margin-left:.4rem; }
.bar > span { display:block; height:100%; background:var(--accent); border-radius:3px; }
.stall-low { color:var(--ok); } .stall-mid { color:var(--warn); } .stall-high { color:var(--bad); }
.unavail { color:var(--bad); }
#server { display:grid; grid-template-columns:repeat(auto-fill, minmax(11rem, 1fr)); \
gap:.4rem 1rem; }
#server div span { display:block; color:var(--mute); font-size:.75rem; }
svg.spark { vertical-align: middle; }
"""

_SCRIPT = """
"use strict";
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};
const bytes = n => {
  if (n === null || n === undefined) return "-";
  const u = ["B", "KiB", "MiB", "GiB", "TiB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + " " + u[i];
};
const pct = x => (x === null || x === undefined) ? "-" : (100 * x).toFixed(1) + "%";
const num = x => (x === null || x === undefined) ? "-" : Math.round(x).toLocaleString("en");
const dur = s => {
  if (s === null || s === undefined) return "-";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s % 3600 / 60), r = s % 60;
  return h ? `${h}h ${m}m` : m ? `${m}m ${r}s` : `${r}s`;
};
function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) tr.appendChild(c);
  return tr;
}
function spark(values) {
  const ns = "http://www.w3.org/2000/svg", w = 120, h = 24;
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("width", w); svg.setAttribute("height", h);
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  const top = Math.max(1, ...values);
  const pts = values.map((v, i) =>
    `${(i * w / Math.max(1, values.length - 1)).toFixed(1)},\
${(h - 1 - v / top * (h - 2)).toFixed(1)}`);
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", pts.join(" ")); line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#2f6fde"); line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  const title = document.createElementNS(ns, "title");
  title.textContent = "images/s over the last 5 minutes (5 s buckets)";
  svg.appendChild(title);
  return svg;
}
function fill(id, rows, empty, columns) {
  const body = document.getElementById(id);
  body.replaceChildren();
  if (!rows.length) {
    const td = el("td", "empty", empty); td.colSpan = columns; body.appendChild(row([td]));
  }
  for (const r of rows) body.appendChild(r);
}
function renderDatasets(list) {
  fill("datasets", list.map(d => {
    if (!d.available) {
      const why = el("td", "unavail", "unavailable: " + d.error); why.colSpan = 8;
      return row([el("td", null, d.name), why]);
    }
    return row([el("td", null, d.name), el("td", "num", num(d.count)), \
el("td", "num", bytes(d.bytes)),
      el("td", null, d.storage), el("td", null, d.fingerprint.slice(0, 12)),
      el("td", "num", pct(d.resident)), el("td", "num", pct(d.read_hit_rate)),
      el("td", "num", d.read_wait_s.toFixed(1) + " s"), el("td", null, d.reads)]);
  }), "no packs under --data", 9);
}
function renderJobs(list) {
  fill("jobs", list.map(j => {
    const done = j.num_batches ? (j.batch + 1) / j.num_batches : 0;
    const progress = el("td", "batch num", `${j.batch + 1} / ${j.num_batches}`);
    const bar = el("span", "bar"); const inner = el("span");
    inner.style.width = (100 * done).toFixed(1) + "%"; bar.appendChild(inner);
    const prog = el("td"); prog.appendChild(bar);
    const stall = el("td", "stall num", j.stall === null ? "-" : pct(j.stall));
    if (j.stall !== null) stall.className += j.stall < 0.1 ? " stall-low" \
: j.stall < 0.5 ? " stall-mid" : " stall-high";
    const aug = el("td", "aug", j.augment); aug.title = j.augment;
    const sp = el("td"); sp.appendChild(spark(j.sparkline));
    const tr = row([el("td", null, j.dataset), el("td", "num", j.seed), \
el("td", "num", j.batch_size),
      el("td", null, j.split || "all"), aug, el("td", "num", `${j.rank}/${j.world_size}`),
      el("td", "epoch num", j.epoch), progress, prog, el("td", "rate num", num(j.images_per_s)),
      el("td", "num", dur(j.eta_s)), el("td", "trainers num", j.trainers), stall, sp]);
    tr.className = "job"; tr.dataset.job = j.metrics_job;
    return tr;
  }), "no job asked for a batch in the last minute", 14);
}
function renderServer(s) {
  const items = [
    ["CPU", `${s.cpu_percent.toFixed(0)}% of ${s.cores} core${s.cores > 1 ? "s" : ""}`],
    ["threads", s.threads], ["queued work", s.queued], ["batches computing", s.inflight],
    ["read-ahead", `${s.readahead_running} running, depth ${s.readahead_depth}`],
    ["cache", `${bytes(s.cache_bytes)} of ${bytes(s.cache_capacity)}`],
    ["cache hit rate", pct(s.cache_hit_rate)], ["batches served", num(s.batches_served)],
    ["4xx / 5xx", `${s.responses_4xx} / ${s.responses_5xx}`], ["uptime", dur(s.uptime_s)],
  ];
  const box = document.getElementById("server");
  box.replaceChildren(...items.map(([k, v]) => {
    const d = el("div", null, v); d.prepend(el("span", null, k)); return d;
  }));
}
async function tick() {
  const state = document.getElementById("state");
  try {
    const r = await fetch("v1/status", {credentials: "same-origin", cache: "no-store"});
    if (r.status === 401) { location.reload(); return; }
    const s = await r.json();
    document.getElementById("version").textContent = "v" + s.version;
    renderServer(s.server); renderDatasets(s.datasets); renderJobs(s.jobs);
    state.className = "live"; \
state.textContent = "live, " + new Date(s.time * 1000).toLocaleTimeString();
  } catch (e) {
    state.className = "offline"; state.textContent = "server not answering; retrying";
  } finally {
    setTimeout(tick, 1000);
  }
}
tick();
"""

_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>batchd status</title><style>{_STYLE}</style></head>
<body>
<header><h1>batchd</h1><span id="version"></span><span id="state">connecting</span></header>
<main>
<section><h2>Live jobs</h2><table>
<thead><tr><th>dataset</th><th class="num">seed</th><th class="num">batch size</th><th>split</th>
<th>augment</th><th class="num">rank</th><th class="num">epoch</th><th class="num">batch k / n</th>
<th></th><th class="num">images/s</th><th class="num">ETA</th><th class="num">trainers</th>
<th class="num">data stall</th><th>last 5 min</th></tr></thead>
<tbody id="jobs"></tbody></table></section>
<section><h2>Datasets</h2><table>
<thead><tr><th>name</th><th class="num">samples</th><th class="num">size</th><th>storage</th>
<th>fingerprint</th><th class="num">in memory</th><th class="num">read hits</th>
<th class="num">I/O wait</th><th>reads</th></tr></thead>
<tbody id="datasets"></tbody></table></section>
<section><h2>Server</h2><div id="server"></div></section>
</main>
<script>{_SCRIPT}</script>
</body></html>
"""


def status_page() -> str:
    """The status page; it fetches ``v1/status`` relative to itself once a second."""
    return _PAGE


def login_page(message: str = "") -> str:
    """The form that posts the server's token to ``/login`` (which sets the cookie)."""
    note = f'<p class="unavail">{html.escape(message)}</p>' if message else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">
<title>batchd: log in</title><style>{_STYLE}</style></head>
<body><header><h1>batchd</h1></header><main><section>
<h2>This server needs its token</h2>{note}
<form method="post" action="login">
<input type="password" name="token" autocomplete="current-password" autofocus
 placeholder="the token given to batchd serve" size="40">
<button type="submit">Open the status page</button></form>
</section></main></body></html>
"""
