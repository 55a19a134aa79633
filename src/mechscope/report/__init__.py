"""Reports of a circuit discovery run: a self-contained HTML page, a JSON summary, the reloadable
scores and circuit, and PNG figures, written together into one directory."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..fileio import OutputError, atomic_dir, check_parent_writable
from .data import attention_patterns, circuit_heads, graph_data, top_edges
from .circuit_figure import circuit_figure
from .figures import circuit_png, curves_png
from .html import json_safe, render

FILES = ("report.html", "summary.json", "scores.safetensors", "circuit.json", "curves.png", "circuit.png",
         "circuit.svg")


class ReportError(OutputError):
    """An output directory that cannot be written."""


def report_context(model, run, example_index: int = 0) -> dict:
    """Everything the page shows, from a `discovery.CircuitDiscovery`."""
    from .. import __version__
    from ..models import model_summary

    method = run.summary["method"]
    scores = run.scores[method]
    graph = graph_data(scores, run.display, run.evaluation)
    heads = circuit_heads(graph)
    ex = run.evaluation.examples[example_index]
    return {
        "summary": run.summary,
        "positional": scores.positional,
        "schema": " | ".join(run.evaluation.schema.spans),
        "model_summary": model_summary(model),
        "graph": graph,
        "default_size": len(run.display) // 2,
        "top_edges": top_edges(graph),
        "attention": attention_patterns(model, run.evaluation, example_index, heads),
        "example_text": ex.clean_text or model.tokenizer.decode(ex.clean),
        "version": __version__,
    }


def check_output_dir(out: str | os.PathLike, overwrite: bool = False) -> None:
    """Raise ReportError unless `out` can become a report directory: new or empty (or, with
    `overwrite`, a previous report directory: one holding summary.json), and inside a writable
    directory (checked before any model work, and again by `write_report`)."""
    out = Path(out)
    check_parent_writable(out, ReportError)  # first: it puts back a report that a killed --overwrite moved aside
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ReportError(f"{out}: exists and is not an empty directory; choose a new --out or pass --overwrite")
        if not out.is_dir() or not (out / "summary.json").is_file():
            raise ReportError(f"{out}: exists and is not a mechscope report directory (no summary.json); "
                              "--overwrite replaces only a previous report")


def write_report(out: str | os.PathLike, model, run, overwrite: bool = False) -> Path:
    """Write every file of FILES into `out`, all at once: they are written into a temporary directory
    beside `out`, which is then renamed into place, so a failure leaves no partial output. With
    `overwrite` a previous report in `out` is replaced only once the new one is complete."""
    out = Path(out)
    check_output_dir(out, overwrite)
    with atomic_dir(out, ReportError, replace=overwrite) as tmp:
        context = report_context(model, run)
        method = run.summary["method"]
        (tmp / "report.html").write_text(render(context), encoding="utf-8")
        (tmp / "summary.json").write_text(json.dumps(json_safe(run.summary), indent=1, allow_nan=False))
        run.scores[method].save(tmp / "scores.safetensors")
        run.circuit.save(tmp / "circuit.json")
        curves_png(run.summary, tmp / "curves.png")
        circuit_png(run, tmp)
    return out


__all__ = ["FILES", "ReportError", "check_output_dir", "circuit_figure", "report_context", "write_report"]
