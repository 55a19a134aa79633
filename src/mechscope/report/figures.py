"""Figures for papers and slides: the faithfulness curves (PNG) and the saved circuit (PNG and SVG,
by circuit_figure.py; matplotlib, non-interactive backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_png(summary: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, key in zip(axes, ("normalized", "soft", "hard")):
        for method, curve in summary["methods"].items():
            pts = [p for p in curve["points"] if p["concrete_edges"] > 0]
            ax.plot([p["concrete_edges"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("concrete token-level edges")
        ax.set_title(f"{key} faithfulness")
        ax.axhline(1.0, color="#999", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{summary['task']} on {summary['model']}: held-out faithfulness")
    fig.savefig(path, dpi=130)
    plt.close(fig)


def circuit_png(run, out: Path) -> None:
    """circuit.png and circuit.svg in directory `out`: the figure of the circuit a `mechscope circuit`
    run saves (`run`, a `discovery.CircuitDiscovery`), with its scores, its concrete size on the
    evaluation examples and its held-out faithfulness."""
    from ..circuits.span_circuit import span_counts
    from .circuit_figure import as_span_circuit, circuit_figure

    s = run.summary
    circuit = as_span_circuit(run.circuit)
    counts = span_counts(run.evaluation, circuit.span_map(run.evaluation), circuit.n_spans)
    counts = {"within": counts["tokens"], "last": counts["last"], "crossing": counts["pairs"]}
    title = f"{s['method']} circuit: {s['task']} on {s['model'] or 'the model'}"
    for name in ("circuit.png", "circuit.svg"):
        circuit_figure(circuit, out / name, scores=run.scores[s["method"]], counts=counts, title=title,
                       faithfulness=s["circuit"])
