"""The summary section: the model (when given) and the data and run behind the report, as two tables."""

from __future__ import annotations

import html
import numbers

from ..page import Section

# Summary entries shown first, with their labels (as `discover_circuit` writes them); any other
# scalar entry follows under its own key.
LABELS = {
    "model": "model", "task": "task", "metric": "metric", "method": "method", "selection": "selection", "ablation": "ablation",
    "seed": "seed", "n_examples": "examples", "model_accuracy": "model accuracy", "metric_clean": "metric clean",
    "metric_counterfactual": "metric counterfactual",
}
# Shown in their own rows (the split, M(model) / M(all ablated)) or elsewhere (warnings: the page header).
HIDDEN = {"n_discovery", "n_evaluation", "metric_model", "metric_ablated", "warnings"}


def fmt(x, digits: int = 3) -> str:
    """A number for a table cell: n/a for None, thousands separators from 1000 up."""
    if x is None:
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return str(x)
    if isinstance(x, numbers.Integral):
        return f"{x:,}"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:.{digits}f}"


def table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows) + "</table>"


def data_rows(summary: dict, schema: list[str] | None = None) -> list[tuple[str, str]]:
    """The data table: the labelled entries in order, the split, the metric's values, the signal,
    then the summary's other scalar entries."""
    s = summary
    rows = [(label, fmt(s[key])) for key, label in LABELS.items() if key in s]
    if "n_discovery" in s and "n_evaluation" in s:
        rows.append(("discovery / evaluation",
                     f"{s['n_discovery']} / {s['n_evaluation']} (examples the model gets right)"))
    if schema:
        rows.append(("schema", " | ".join(schema)))
    if "metric_model" in s and "metric_ablated" in s:
        rows.append(("M(model) / M(all ablated), evaluation set", f"{fmt(s['metric_model'])} / {fmt(s['metric_ablated'])}"))
    signal = s.get("signal")
    if isinstance(signal, dict) and "gap" in signal:
        rows.append(("M(model) − M(all ablated) ± standard error",
                     f"{fmt(signal['gap'])} ± {fmt(signal.get('gap_se'))}" + (" (weak)" if signal.get("weak") else "")))
    for key, value in s.items():
        scalar = value is None or isinstance(value, (str, numbers.Real))
        if scalar and key not in LABELS and key not in HIDDEN:
            rows.append((str(key), fmt(value)))
    return rows


def section(summary: dict, model_summary: dict | None = None, schema: list[str] | None = None) -> Section:
    """The "summary" section of `summary` (a run's JSON summary or any dict of the user's), with the
    model's table when `model_summary` (`models.model_summary`) is given and the dataset's `schema`."""
    tables = []
    if model_summary:
        tables.append(table([(k, fmt(v) if isinstance(v, numbers.Real) else str(v)) for k, v in model_summary.items()]))
    tables.append(table(data_rows(summary, schema)))
    body = '<div class="charts">' + "".join(f"<div>{t}</div>" for t in tables) + "</div>"
    return Section(id="summary", title="Model and data" if model_summary else "Data", html=body)
