"""The faithfulness curves section: normalized, soft and hard faithfulness of each method's circuits
against their concrete token-level edges (drawn by assets/curves.js), the areas under the curves, and
a note on the saved circuit."""

from __future__ import annotations

import html

from ..page import Section
from .summary import fmt

POINT_KEYS = ("fraction", "n_edges", "concrete_edges", "normalized", "soft", "hard")


def points(curve) -> list[dict]:
    """A `Curve`'s points as the chart reads them."""
    return [{k: getattr(p, k) for k in POINT_KEYS} for p in curve.points]


def saved_note(saved: dict) -> str:
    """A sentence on the saved circuit: its size and, when measured, its faithfulness; the target it
    was chosen by when `saved` names one."""
    how = (f"the smallest on the curve with normalized faithfulness ≥ {fmt(saved['target'], 2)}"
           if saved.get("target") is not None else "the circuit given")
    size = f"{fmt(saved['n_edges'])} span edges"
    if saved.get("concrete_edges") is not None:
        size += f", {fmt(saved['concrete_edges'], 0)} concrete token-level edges per example"
    measured = ""
    if saved.get("normalized") is not None:
        measured = (f", normalized {fmt(saved['normalized'])}, soft {fmt(saved.get('soft'))}, "
                    f"hard {fmt(saved.get('hard'))}")
    return f'<p class="note">Saved circuit (circuit.json): {html.escape(how)}: {html.escape(size + measured)}.</p>'


def section(curves: dict, saved: dict | None = None) -> Section:
    """The "curves" section of `curves` (method -> `evaluation.Curve`). `saved`: the saved circuit's
    n_edges, concrete_edges and, when it is on a curve, normalized / soft / hard (and the `target` it was
    chosen by), for the note under the table."""
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td><td class=num>{fmt(c.cpr)}</td><td class=num>{fmt(c.cmd)}</td>"
        f"<td class=num>{fmt(c.cpr_concrete if c.concrete_full else None)}</td>"
        f"<td class=num>{fmt(c.cmd_concrete if c.concrete_full else None)}</td></tr>"
        for m, c in curves.items()
    )
    body = ('<div class="legend" id="curve-legend"></div>'
            '<div class="charts"><svg class="chart" id="curve-normalized"></svg><svg class="chart" id="curve-soft"></svg>'
            '<svg class="chart" id="curve-hard"></svg></div>'
            "<table><tr><th>method</th><th>CPR</th><th>CMD</th><th>CPR (concrete axis)</th>"
            f"<th>CMD (concrete axis)</th></tr>{rows}</table>")
    if saved:
        body += saved_note(saved)
    return Section(id="curves", title="Faithfulness on held-out examples", html=body,
                   data={"curves": {m: points(c) for m, c in curves.items()}}, assets=("curves.js", "curves.css"))
