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


def feature_curve_png(curves: dict[str, list[tuple[int, float]]], title: str, path: Path) -> None:
    """Normalised faithfulness against the number of (span, latent) nodes kept (log axis; n = 0 drawn at
    0.5), a line per curve. `curves`: label -> [(n, faithfulness)]."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    for (label, points), marker in zip(curves.items(), "os^v"):
        ax.plot([max(n, 0.5) for n, _ in points], [f for _, f in points], marker=marker, label=label)
    ax.set_xscale("log")
    ticks = sorted({max(n, 0.5) for points in curves.values() for n, _ in points})
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0" if t == 0.5 else str(int(t)) for t in ticks], fontsize=8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.axhline(0.0, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("(span, latent) nodes kept (top n by |EAP score|)")
    ax.set_ylabel("normalised faithfulness")
    import textwrap

    ax.set_title(textwrap.fill(title, 80), fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
