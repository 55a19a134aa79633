"""The tracr benchmark's outputs: a self-contained HTML page (inline CSS, no scripts or network) and
the JSON summary, written together into a new directory."""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path

from ...fileio import atomic_dir
from ...report import ReportError, check_output_dir
from ...report.page import CSS, json_safe

FILES = ("report.html", "benchmark.json")


def fmt_auroc(x) -> str:
    """Three decimals, or n/a for a missing (NaN) AUROC (a class was empty)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _cell(x) -> str:
    """A table cell with a bar whose width is the AUROC; values below 0.8 are marked."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return '<td class="num">n/a</td>'
    colour = "#2f7d4f" if x >= 0.95 else ("#c98a16" if x >= 0.8 else "#b3392f")
    bar = f'<span style="display:inline-block;width:{60 * x:.0f}px;height:8px;background:{colour};margin-right:6px"></span>'
    return f'<td class="num">{bar}{x:.3f}</td>'


SECTIONS = (("edge_auroc", "Edge-level ROC AUC (contrast circuit)"),
            ("node_auroc", "Node-level ROC AUC (contrast circuit)"),
            ("program_edge_auroc", "Edge-level ROC AUC (the program's whole circuit)"),
            ("program_node_auroc", "Node-level ROC AUC (the program's whole circuit)"))


def render_benchmark(summary: dict) -> str:
    methods = summary["methods"]
    head = "".join(f"<th>{html.escape(m)}</th><th>{html.escape(m)} (floor)</th>" for m in methods)
    sections = []
    for key, title in SECTIONS:
        rows = []
        for r in summary["programs"]:
            cells = "".join(_cell(r[key][m]) + _cell(r[f"{key}_floor"][m]) for m in methods)
            rows.append(f"<tr><td>{html.escape(r['program'])}</td>{cells}</tr>")
        means = "".join(_cell(summary["means"][m][key]) + _cell(summary["means"][m][f"{key}_floor"]) for m in methods)
        rows.append(f"<tr><th>mean</th>{means}</tr>")
        sections.append(f"<section><h2>{title}</h2><table><tr><th>program</th>{head}</tr>{''.join(rows)}</table></section>")
    detail = []
    for r in summary["programs"]:
        truth, whole = r["truth"], r["program_truth"]
        inputs = r.get("inputs", {})
        drawn = f"{inputs.get('evaluated', 'n/a')} of {inputs.get('space', 'n/a')}; {inputs.get('dropped', 0)} dropped"
        detail.append(
            f"<tr><td>{html.escape(r['program'])}</td><td>{html.escape(r['description'])}</td>"
            f"<td class='num'>{html.escape(drawn)}</td>"
            f"<td class='num'>{r['n_layers']}</td><td class='num'>{r['n_heads']}</td><td class='num'>{r['n_edges']}</td>"
            f"<td class='num'>{whole['n_edges']}</td><td class='num'>{truth['n_edges']}</td>"
            f"<td>{html.escape(', '.join(truth['edges']))}</td></tr>")
    best = summary["best_method"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mechscope: circuit finders on compiled ground truth</title>
<style>{CSS}</style></head><body>
<header><h1>Circuit finders against compiled ground truth (tracr)</h1>
<p>{len(summary['programs'])} programs, {summary['n_examples']} prompt pairs each, seed {summary['seed']};
best method {html.escape(best)}: mean edge-level AUROC {fmt_auroc(summary['best_mean_edge_auroc'])};
floored, best {html.escape(summary['best_method_floor'])}: {fmt_auroc(summary['best_mean_edge_auroc_floor'])}</p></header>
<main>
<section><h2>How to read this</h2><p class="note">Each program is compiled by tracr into a transformer whose
circuit is known by construction. A method scores every edge of the model's graph on clean /
counterfactual pairs; the ROC AUC says how well |score| ranks the circuit's edges (or nodes: heads and
MLPs) above the rest (1 = perfectly, 0.5 = chance; n/a when every node is in the circuit). The contrast
circuit keeps the edges that carry a value the counterfactuals change into a component whose output
changes; the whole circuit includes parts no counterfactual of equal length can change (such as a
length computation). The edges outside a compiled circuit score exactly 0, so a circuit edge
scoring 10<sup>-15</sup> still ranks above them; the <em>floor</em> columns first set each method's
scores below {summary['floor']:g} times its largest score on the program to 0, so such edges tie with
the rest (ties count one half). Bars: green &ge; 0.95, amber &ge; 0.8, red below. Each edge's scores
are in benchmark.json.</p></section>
{''.join(sections)}
<section><h2>Programs and their circuits</h2><table><tr><th>program</th><th>computes</th>
<th>inputs evaluated (dropped: the program raised)</th><th>layers</th>
<th>heads</th><th>graph edges</th><th>circuit edges (whole)</th><th>circuit edges (contrast)</th><th>contrast circuit</th></tr>
{''.join(detail)}</table></section>
<script type="application/json" id="benchmark-data">{html.escape(json.dumps(json_safe(summary), allow_nan=False))}</script>
</main></body></html>
"""


def benchmark_json(summary: dict) -> str:
    """The summary as indented JSON, with each list of plain values (the per-edge names, flags and
    scores) on one line so that the file stays readable."""
    text = json.dumps(json_safe(summary), indent=1, allow_nan=False)
    # Newlines in json.dumps output are all layout (strings escape theirs), so only layout changes.
    flat = re.compile(r"\[\n *([^\[\]{}\n]*(?:\n *[^\[\]{}\n]*)*)\n *\]")
    return flat.sub(lambda m: "[" + re.sub(r"\n *", " ", m.group(1)) + "]", text)


def write_benchmark(out: str | Path, summary: dict) -> Path:
    """Write report.html and benchmark.json into the new directory `out`, all or nothing."""
    out = Path(out)
    check_output_dir(out)
    with atomic_dir(out, ReportError) as tmp:
        (tmp / "report.html").write_text(render_benchmark(summary), encoding="utf-8")
        (tmp / "benchmark.json").write_text(benchmark_json(summary))
    return out
