"""The self-contained HTML report: one file, its data embedded as JSON, its styles and scripts inline
(no network, no external libraries); charts and the circuit graph are drawn as SVG by the script."""

from __future__ import annotations

import html
import json
import math

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0; color: #1d2330; background: #fafbfc; }
header { background: #1d2330; color: #fff; padding: 14px 24px; }
header h1 { margin: 0; font-size: 20px; }
header p { margin: 4px 0 0; color: #c9d1e0; font-size: 13px; }
main { padding: 12px 24px 40px; max-width: 1400px; }
section { background: #fff; border: 1px solid #e2e6ee; border-radius: 6px; padding: 12px 16px; margin: 14px 0; }
h2 { font-size: 16px; margin: 2px 0 10px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border-bottom: 1px solid #eef0f4; padding: 3px 10px 3px 0; text-align: left; }
th { color: #5a6275; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
.chart { width: 380px; height: 250px; }
.chart text, #graph text, #attention text { font-size: 11px; fill: #3a4256; }
.axis line, .axis path { stroke: #9aa3b5; }
.legend { font-size: 12px; margin: 4px 0; }
.legend span { display: inline-block; width: 14px; height: 3px; margin: 0 4px 3px 12px; vertical-align: middle; }
#graph-wrap { position: relative; }
#graph { width: 100%; height: 640px; border: 1px solid #eef0f4; background: #fcfdff; }
.edge { fill: none; stroke-linecap: round; opacity: 0.75; cursor: pointer; }
.edge:hover { opacity: 1; stroke: #111 !important; }
.node { stroke: #fff; stroke-width: 1; cursor: pointer; }
#tooltip { position: absolute; pointer-events: none; background: #1d2330; color: #fff; font-size: 12px;
           padding: 5px 8px; border-radius: 4px; display: none; white-space: nowrap; z-index: 5; }
.controls { font-size: 13px; margin-bottom: 8px; }
.controls input[type=range] { width: 260px; vertical-align: middle; }
#attention { width: 100%; max-width: 720px; height: 560px; }
.note { color: #5a6275; font-size: 12px; }
.warning { color: #8a4b00; background: #fff4e0; border: 1px solid #f0c36d; padding: 6px 10px; border-radius: 4px; }
"""

SCRIPT = r"""
(function () {
  const data = JSON.parse(document.getElementById('report-data').textContent);
  const NS = 'http://www.w3.org/2000/svg';
  const COLORS = ['#2563eb', '#d97706', '#059669', '#7c3aed'];
  function el(tag, attrs, parent) {
    const e = document.createElementNS(NS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    if (parent) parent.appendChild(e);
    return e;
  }
  const tooltip = document.getElementById('tooltip');
  function showTip(evt, text) {
    const box = document.getElementById('graph-wrap').getBoundingClientRect();
    tooltip.textContent = text;
    tooltip.style.display = 'block';
    tooltip.style.left = (evt.clientX - box.left + 12) + 'px';
    tooltip.style.top = (evt.clientY - box.top + 12) + 'px';
  }
  function hideTip() { tooltip.style.display = 'none'; }
  function fmt(x) {
    if (x === null || x === undefined || Number.isNaN(x)) return 'n/a';
    const a = Math.abs(x);
    if (a >= 1000) return Math.round(x).toLocaleString('en-US');
    if (a >= 1) return x.toFixed(2);
    return x.toPrecision(3);
  }

  // ---- faithfulness curves against concrete edges (log axis) ----
  function chart(svg, key, label) {
    const W = 400, H = 260, L = 46, R = 10, T = 18, B = 36;
    svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
    const methods = Object.keys(data.curves);
    let xs = [], ys = [];
    const ok = p => p.concrete_edges > 0 && p[key] !== null;
    methods.forEach(m => data.curves[m].filter(ok).forEach(p => { xs.push(p.concrete_edges); ys.push(p[key]); }));
    if (!xs.length) return;
    const x0 = Math.log10(Math.min(...xs)), x1 = Math.log10(Math.max(...xs));
    const y0 = Math.min(0, ...ys), y1 = Math.max(1.05, ...ys);
    const X = v => L + (Math.log10(v) - x0) / Math.max(1e-9, x1 - x0) * (W - L - R);
    const Y = v => T + (1 - (v - y0) / (y1 - y0)) * (H - T - B);
    const axis = el('g', {class: 'axis'}, svg);
    el('line', {x1: L, y1: H - B, x2: W - R, y2: H - B}, axis);
    el('line', {x1: L, y1: T, x2: L, y2: H - B}, axis);
    for (let d = Math.ceil(x0); d <= Math.floor(x1); d++) {
      el('line', {x1: X(10 ** d), y1: H - B, x2: X(10 ** d), y2: H - B + 4}, axis);
      el('text', {x: X(10 ** d), y: H - B + 15, 'text-anchor': 'middle'}, axis).textContent = '1e' + d;
    }
    [0, 0.5, 1].forEach(v => {
      el('line', {x1: L - 4, y1: Y(v), x2: W - R, y2: Y(v), stroke: '#eef0f4'}, axis);
      el('text', {x: L - 6, y: Y(v) + 4, 'text-anchor': 'end'}, axis).textContent = v;
    });
    el('text', {x: (L + W - R) / 2, y: H - 4, 'text-anchor': 'middle'}, svg).textContent = 'concrete token-level edges';
    el('text', {x: L, y: 12}, svg).textContent = label;
    methods.forEach((m, i) => {
      const pts = data.curves[m].filter(ok);
      el('path', {d: pts.map((p, j) => (j ? 'L' : 'M') + X(p.concrete_edges) + ' ' + Y(p[key])).join(' '),
                  stroke: COLORS[i], 'stroke-width': 2, fill: 'none', class: 'curve'}, svg);
      pts.forEach(p => {
        const c = el('circle', {cx: X(p.concrete_edges), cy: Y(p[key]), r: 3, fill: COLORS[i]}, svg);
        el('title', {}, c).textContent = `${m}: ${fmt(p.concrete_edges)} concrete edges, ${key} ${fmt(p[key])}`;
      });
    });
  }
  const legend = document.getElementById('curve-legend');
  Object.keys(data.curves).forEach((m, i) => {
    legend.insertAdjacentHTML('beforeend', `<span style="background:${COLORS[i]}"></span>${m}`);
  });
  chart(document.getElementById('curve-normalized'), 'normalized', 'normalized faithfulness');
  chart(document.getElementById('curve-soft'), 'soft', 'soft faithfulness');
  chart(document.getElementById('curve-hard'), 'hard', 'hard faithfulness');

  // ---- the circuit graph ----
  const G = data.graph;
  G.edges.forEach(e => { if (e.score === null) e.score = NaN; });  // no score of its own
  const svg = document.getElementById('graph');
  const nSpans = G.spans.length;
  const W = 1320, H = 640;
  const PAD = 40;
  svg.setAttribute('viewBox', `0 0 ${W} ${H}`);
  const px = x => PAD + x / nSpans * (W - 2 * PAD);
  const py = y => H - PAD - y / Math.max(1, G.n_rows - 1) * (H - 2 * PAD);
  G.spans.forEach((s, i) => {
    el('rect', {x: px(i), y: 8, width: (W - 2 * PAD) / nSpans, height: H - 16,
                fill: i % 2 ? '#f4f6fa' : '#fcfdff'}, svg);
    el('text', {x: px(i + 0.5), y: H - 10, 'text-anchor': 'middle'}, svg).textContent = s;
  });
  const pos = {};
  G.nodes.forEach(n => { pos[n.id] = [px(n.x), py(n.y)]; });
  const maxAbs = Math.max(1e-12, ...G.edges.map(e => Number.isNaN(e.score) ? 0 : Math.abs(e.score)));
  const edgeEls = G.edges.map((e, i) => {
    const [x1, y1] = pos[e.source], [x2, y2] = pos[e.target];
    const bend = e.kind === 'within' ? 0 : 18;
    const d = `M${x1} ${y1} Q${(x1 + x2) / 2 + bend} ${(y1 + y2) / 2} ${x2} ${y2}`;
    const w = Number.isNaN(e.score) ? 1 : 0.6 + 4.4 * Math.abs(e.score) / maxAbs;
    const color = Number.isNaN(e.score) ? '#9aa3b5' : (e.score >= 0 ? '#2563eb' : '#dc2626');
    const p = el('path', {d: d, class: 'edge', 'stroke-width': w, stroke: color, 'data-index': i,
                          'stroke-dasharray': e.kind === 'within' ? '' : '4 2'}, svg);
    p.addEventListener('mousemove', evt => showTip(evt,
      `${e.source} \u2192 ${e.target} (${e.kind}${e.key_span ? ' vs keys@' + e.key_span : ''}) \u00b7 score ${fmt(e.score)} \u00b7 concrete edges ${fmt(e.concrete)}`));
    p.addEventListener('mouseleave', hideTip);
    return p;
  });
  const KIND_COLOR = {input: '#111827', logits: '#111827', head: '#7c3aed', mlp: '#059669', q: '#f59e0b', k: '#0ea5e9', v: '#ec4899'};
  const nodeEls = {};
  G.nodes.forEach(n => {
    const [x, y] = pos[n.id];
    const r = (n.kind === 'head' || n.kind === 'mlp' || n.kind === 'input' || n.kind === 'logits') ? 5 : 3.2;
    const c = el('circle', {cx: x, cy: y, r: r, class: 'node', fill: KIND_COLOR[n.kind], 'data-id': n.id}, svg);
    c.addEventListener('mousemove', evt => showTip(evt, `${n.label} at span ${n.span}`));
    c.addEventListener('mouseleave', hideTip);
    nodeEls[n.id] = c;
  });
  const slider = document.getElementById('size-slider');
  const count = document.getElementById('edge-count');
  function showSize(k) {
    const bit = 1 << k;
    const used = new Set();
    let shown = 0;
    G.edges.forEach((e, i) => {
      const on = (e.sizes & bit) !== 0;
      edgeEls[i].style.display = on ? '' : 'none';
      if (on) { shown++; used.add(e.source); used.add(e.target); }
    });
    Object.keys(nodeEls).forEach(id => { nodeEls[id].style.display = used.has(id) ? '' : 'none'; });
    count.textContent = `${shown} span edges, ${used.size} nodes`;
    count.dataset.edges = shown;
    count.dataset.nodes = used.size;
  }
  slider.max = G.sizes.length - 1;
  slider.value = data.default_size;
  slider.addEventListener('input', () => showSize(+slider.value));
  showSize(+slider.value);

  // ---- attention patterns ----
  const A = data.attention;
  const select = document.getElementById('head-select');
  const att = document.getElementById('attention');
  A.heads.forEach((h, i) => select.insertAdjacentHTML('beforeend', `<option value="${i}">${h.name}</option>`));
  function drawAttention(i) {
    while (att.firstChild) att.removeChild(att.firstChild);
    if (!A.heads.length) return;
    const P = A.heads[i].pattern, n = P.length, cell = Math.min(28, 440 / n), off = 130;
    att.setAttribute('viewBox', `0 0 ${off + n * cell + 10} ${off + n * cell + 10}`);
    for (let q = 0; q < n; q++) {
      el('text', {x: off - 4, y: off + q * cell + cell * 0.7, 'text-anchor': 'end'}, att).textContent = A.tokens[q];
      el('text', {x: 0, y: 0, transform: `translate(${off + q * cell + cell * 0.7},${off - 4}) rotate(-60)`}, att).textContent = A.tokens[q];
      for (let k = 0; k <= q; k++) {
        const v = P[q][k];
        const r = el('rect', {x: off + k * cell, y: off + q * cell, width: cell - 1, height: cell - 1,
                              fill: `rgba(124, 58, 237, ${Math.max(0.03, v)})`}, att);
        el('title', {}, r).textContent = `${A.tokens[q]} (${A.spans[q]}) attends to ${A.tokens[k]} (${A.spans[k]}): ${v.toFixed(3)}`;
      }
    }
  }
  select.addEventListener('change', () => drawAttention(+select.value));
  drawAttention(0);
})();
"""


def json_safe(obj):
    """`obj` with every NaN or infinity replaced by None (strict JSON, which a browser's JSON.parse needs)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _kind_label(edge: dict) -> str:
    """An edge's kind for the tables: a per-key query edge also names the key span it scores against."""
    key_span = edge.get("key_span")
    return html.escape(f"{edge['kind']} (keys@{key_span})" if key_span else edge["kind"])


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def render(context: dict) -> str:
    """The report page for `context` (see report.write_report)."""
    s = context["summary"]

    def num(x, digits=3):
        return "n/a" if x is None else (f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}")

    model_rows = [(k, str(v)) for k, v in context["model_summary"].items()]
    data_rows = [
        ("task", s["task"]), ("metric", s["metric"]), ("examples", str(s["n_examples"])),
        ("discovery / evaluation", f"{s['n_discovery']} / {s['n_evaluation']} (examples the model gets right)"),
        ("schema", " | ".join(context["graph"]["spans"]) if context["positional"] else context["schema"]),
        ("model accuracy", num(s["model_accuracy"])), ("metric clean", num(s["metric_clean"])),
        ("metric counterfactual", num(s["metric_counterfactual"])),
        ("M(model) / M(all ablated), evaluation set", f"{num(s['metric_model'])} / {num(s['metric_ablated'])}"),
    ]
    signal = s.get("signal")
    if signal:
        data_rows.append(("M(model) − M(all ablated) ± standard error",
                          f"{num(signal['gap'])} ± {num(signal['gap_se'])}" + (" (weak)" if signal["weak"] else "")))
    warnings = "".join(f'<p class="warning">warning: {html.escape(w)}</p>' for w in s.get("warnings", []))
    methods = "".join(
        f"<tr><td>{html.escape(m)}</td><td class=num>{num(c['cpr'])}</td><td class=num>{num(c['cmd'])}</td>"
        f"<td class=num>{num(c['cpr_concrete'])}</td><td class=num>{num(c['cmd_concrete'])}</td></tr>"
        for m, c in s["methods"].items()
    )
    c = s["circuit"]
    top = "".join(
        f"<tr><td>{html.escape(e['source'])}</td><td>{html.escape(e['target'])}</td><td>{_kind_label(e)}</td>"
        f"<td class=num>{e['score']:.4g}</td><td class=num>{e['concrete']:.3g}</td></tr>"
        for e in context["top_edges"]
    )
    payload = json.dumps(json_safe({
        "curves": {m: c["points"] for m, c in s["methods"].items()},
        "graph": context["graph"],
        "default_size": context["default_size"],
        "attention": context["attention"],
    }), allow_nan=False).replace("</", "<\\/")
    title = f"mechscope: {s['method']} circuit for {s['task']} on {s['model']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>{CSS}</style></head>
<body>
<header><h1>{html.escape(title)}</h1>
<p>seed {s['seed']} · selection {html.escape(s['selection'])} · generated by mechscope {html.escape(context['version'])}</p>
{warnings}</header>
<main>
<section id="summary"><h2>Model and data</h2>
<div class="charts"><div>{_table(model_rows)}</div><div>{_table(data_rows)}</div></div></section>
<section id="curves"><h2>Faithfulness on held-out examples</h2>
<div class="legend" id="curve-legend"></div>
<div class="charts"><svg class="chart" id="curve-normalized"></svg><svg class="chart" id="curve-soft"></svg>
<svg class="chart" id="curve-hard"></svg></div>
<table><tr><th>method</th><th>CPR</th><th>CMD</th><th>CPR (concrete axis)</th><th>CMD (concrete axis)</th></tr>{methods}</table>
<p class="note">Saved circuit (circuit.json): the smallest on the curve with normalized faithfulness ≥ {c['target']}:
{num(c['n_edges'], 0)} span edges, {num(c['concrete_edges'], 0)} concrete token-level edges per example,
normalized {num(c['normalized'])}, soft {num(c['soft'])}, hard {num(c['hard'])}.</p></section>
<section id="circuit"><h2>The circuit (span level)</h2>
<div class="controls">circuit size <input type="range" id="size-slider" min="0" step="1">
<span id="edge-count"></span>
<span class="note">· nodes by span (columns) and layer (rows); solid: within-position edges, dashed: key / value /
query edges inside attention; width ∝ |score|, blue positive, red negative; hover for scores</span></div>
<div id="graph-wrap"><svg id="graph"></svg><div id="tooltip"></div></div></section>
<section id="top-edges"><h2>Top edges</h2>
<table><tr><th>from</th><th>to</th><th>kind</th><th>score</th><th>concrete edges</th></tr>{top}</table></section>
<section id="attention-view"><h2>Attention patterns of circuit heads</h2>
<div class="controls">head <select id="head-select"></select>
<span class="note">example: {html.escape(context['example_text'])}</span></div>
<svg id="attention"></svg></section>
</main>
<script type="application/json" id="report-data">{payload}</script>
<script>{SCRIPT}</script>
</body></html>
"""
