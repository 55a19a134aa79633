"""Figures for papers and slides: the faithfulness curves (PNG); the circuit figure is circuit_figure.py's
(matplotlib, non-interactive backend)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def curves_png(curves: dict[str, list[dict]], title: str, path: Path) -> None:
    """Normalized, soft and hard faithfulness against concrete token-level edges (log axis), a line per
    method. `curves`: method -> points with concrete_edges, normalized, soft and hard."""
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for ax, key in zip(axes, ("normalized", "soft", "hard")):
        for method, points in curves.items():
            pts = [p for p in points if (p["concrete_edges"] or 0) > 0 and p[key] is not None]
            ax.plot([p["concrete_edges"] for p in pts], [p[key] for p in pts], marker="o", ms=3, label=method)
        ax.set_xscale("log")
        ax.set_xlabel("concrete token-level edges")
        ax.set_title(f"{key} faithfulness")
        ax.axhline(1.0, color="#999", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.savefig(path, dpi=130)
    plt.close(fig)
