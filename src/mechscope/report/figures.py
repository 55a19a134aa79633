"""PNG figures for papers and slides: the faithfulness curves and the circuit graph (matplotlib,
non-interactive backend)."""

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


def circuit_png(graph: dict, size_index: int, path: Path) -> None:
    bit = 1 << size_index
    edges = [e for e in graph["edges"] if e["sizes"] & bit]
    pos = {n["id"]: (n["x"], n["y"]) for n in graph["nodes"]}
    used = {e["source"] for e in edges} | {e["target"] for e in edges}
    n_spans = len(graph["spans"])
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * n_spans), 8), constrained_layout=True)
    finite = [abs(e["score"]) for e in edges if e["score"] is not None]
    top = max(finite) if finite else 1.0
    for e in edges:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        score = e["score"] if e["score"] is not None else 0.0
        ax.plot([x1, x2], [y1, y2], color="#2563eb" if score >= 0 else "#dc2626",
                lw=0.4 + 3 * abs(score) / (top or 1.0), alpha=0.7, ls="-" if e["kind"] == "within" else "--")
    colors = {"input": "#111827", "logits": "#111827", "head": "#7c3aed", "mlp": "#059669", "q": "#f59e0b",
              "k": "#0ea5e9", "v": "#ec4899"}
    for n in graph["nodes"]:
        if n["id"] in used:
            ax.scatter([n["x"]], [n["y"]], s=18 if n["kind"] in ("q", "k", "v") else 34, color=colors[n["kind"]],
                       zorder=3)
    ax.set_xticks([i + 0.5 for i in range(n_spans)], graph["spans"], rotation=30, ha="right")
    ax.set_yticks([])
    ax.set_xlim(0, n_spans)
    ax.set_title(f"circuit: {len(edges)} span edges")
    for i in range(1, n_spans):
        ax.axvline(i, color="#eee", lw=0.8, zorder=0)
    fig.savefig(path, dpi=130)
    plt.close(fig)
