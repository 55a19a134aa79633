"""The edges section: the top edges by |score| as a table that sorts by any column when its header is
clicked (assets/edges.js), and the columns of edges.csv, which holds every edge the table is taken from."""

from __future__ import annotations

import csv
import html
import os
from pathlib import Path

import numpy as np

from ...circuits.edge_table import KINDS
from ..page import Section
from .summary import fmt

COLUMNS = ("name", "parent", "child", "type", "spans", "score", "concrete")
TABLE_ROWS = 100


def edge_columns(edges) -> dict[str, np.ndarray]:
    """The edges (`edge_table.SpanEdges`) as the columns of COLUMNS, one entry per edge, in their order.
    spans: the span of a within edge or whole-row query edge, "key span->query span" for key, value and
    per-key query edges; score and concrete are float64, NaN where unknown."""
    spans = list(edges.spans)
    n = len(spans)
    # Every (key span, span) pair's label, indexed by (key_span + 1) * n + span (key_span -1: none).
    labels = np.array([spans[s] if k < 0 else f"{spans[k]}->{spans[s]}" for k in range(-1, n) for s in range(n)],
                      dtype=object)
    node_names = np.array(edges.nodes.names, dtype=object)
    return {
        "name": np.array(edges.names(), dtype=object),
        "parent": node_names[edges.parent.numpy()],
        "child": node_names[edges.child.numpy()],
        "type": np.array(KINDS, dtype=object)[edges.kind.numpy()],
        "spans": labels[(edges.key_span.numpy() + 1) * n + edges.span.numpy()],
        "score": edges.score.double().numpy(),
        "concrete": edges.concrete.double().numpy(),
    }


def _text(values: np.ndarray) -> np.ndarray:
    """Floats as CSV text: their shortest round-tripping form, empty where NaN."""
    return np.where(np.isnan(values), "", values.astype(str))


def write_csv(columns: dict[str, np.ndarray], path: str | os.PathLike) -> Path:
    """edges.csv: a header of COLUMNS, then one row per edge."""
    path = Path(path)
    # Plain lists: the csv writer reads them several times faster than numpy arrays' elements.
    cells = [(columns[c] if c not in ("score", "concrete") else _text(columns[c])).tolist() for c in COLUMNS]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        writer.writerows(zip(*cells))
    return path


def _cell(text: str, value=None) -> str:
    """A cell; numeric cells carry their value (`data-v`) for sorting and align right."""
    if value is None:
        return f"<td>{html.escape(text)}</td>"
    v = "" if np.isnan(value) else repr(float(value))
    return f'<td class="num" data-v="{v}">{html.escape(text)}</td>'


def section(columns: dict[str, np.ndarray], what: str, limit: int = TABLE_ROWS) -> Section:
    """The "edges" section: the first `limit` rows of `columns` (`edge_columns`, sorted by descending
    |score|). `what` names the edges, for the note (e.g. "the saved circuit's 412 span edges")."""
    n = len(columns["name"])
    head = ("<tr><th>from</th><th>to</th><th>type</th><th>spans</th>"
            '<th data-num="1">score</th><th data-num="1">concrete edges</th></tr>')
    rows = "".join(
        "<tr>" + _cell(columns["parent"][i]) + _cell(columns["child"][i]) + _cell(columns["type"][i])
        + _cell(columns["spans"][i]) + _cell(fmt(None if np.isnan(s) else float(s), 4), s)
        + _cell(fmt(None if np.isnan(c) else float(c), 3), c) + "</tr>"
        for i, s, c in zip(range(min(n, limit)), columns["score"], columns["concrete"])
    )
    shown = f"the top {min(n, limit):,}" if n > limit else f"all {n:,}"
    note = (f'<p class="note">{html.escape(what)}: {shown} by |score| (click a column header to sort). '
            f"edges.csv holds all {n:,} of them, with their unique names.</p>")
    return Section(id="edges", title="Top edges", html=note + f'<table class="sortable"><thead>{head}</thead><tbody>{rows}</tbody></table>',
                   assets=("edges.js", "edges.css"))
