"""The [layer, head] heatmap section shared by direct logit attribution and path-patching sweeps: a
table coloured by value (drawn on the server, no script), the largest terms listed beside it, and the
same map as a PNG figure (`heatmap_png`)."""

from __future__ import annotations

import html
import math
from pathlib import Path

import torch

from ..page import Section
from .summary import fmt


def _colour(value: float, scale: float) -> str:
    """Blue for positive, red for negative, white at 0; saturated at |value| = scale."""
    if not math.isfinite(value) or scale <= 0:
        return "#ffffff"
    a = min(1.0, abs(value) / scale)
    r, g, b = (37, 99, 235) if value > 0 else (220, 38, 38)
    mix = lambda c: round(255 + (c - 255) * a)  # noqa: E731
    return f"#{mix(r):02x}{mix(g):02x}{mix(b):02x}"


def heatmap_table(grid: torch.Tensor, row_label: str = "layer", col_label: str = "head") -> str:
    """An HTML table of `grid` [rows, cols] ([rows] is one column), each cell coloured by its value."""
    grid = grid.detach().float().cpu()
    if grid.dim() == 1:
        grid = grid[:, None]
    finite = grid[grid.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() else 0.0
    head = "".join(f"<th>{col_label} {c}</th>" for c in range(grid.shape[1]))
    rows = []
    for r in range(grid.shape[0]):
        cells = "".join(
            f'<td class=num style="background:{_colour(float(v), scale)}" title="{row_label} {r}, {col_label} {c}: '
            f'{fmt(float(v), 4)}">{fmt(float(v), 2)}</td>' for c, v in enumerate(grid[r].tolist()))
        rows.append(f"<tr><th>{row_label} {r}</th>{cells}</tr>")
    return f'<table class="heatmap"><tr><th></th>{head}</tr>{"".join(rows)}</table>'


def section(section_id: str, title: str, grid: torch.Tensor, top: list[tuple[str, float]], note: str = "",
            extra: dict | None = None) -> Section:
    """A heatmap section: `grid` [layer, head] (or [layer]), `top` (name, value) pairs listed beside it,
    `note` a sentence on what the values are."""
    items = "".join(f"<tr><td>{html.escape(n)}</td><td class=num>{fmt(v, 3)}</td></tr>" for n, v in top)
    body = (f'<p class="note">{html.escape(note)}</p>' if note else "") + heatmap_table(grid)
    body += f"<h3>Largest terms</h3><table><tr><th>node</th><th>value</th></tr>{items}</table>"
    data = {"grid": grid.detach().float().cpu().tolist(), "top": [list(t) for t in top], **(extra or {})}
    css = (".heatmap td{min-width:3.2em;font-size:12px;text-align:right}"
           ".heatmap th{font-size:12px;font-weight:normal;color:#555}")
    return Section(id=section_id, title=title, html=body, data=data, css=css)


def heatmap_png(grid: torch.Tensor, title: str, path: Path, label: str) -> None:
    """`grid` [layer, head] (or [layer]) as a PNG heatmap, a diverging colour scale centred on 0."""
    from ..figures import plt

    g = grid.detach().float().cpu()
    if g.dim() == 1:
        g = g[:, None]
    finite = g[g.isfinite()]
    scale = float(finite.abs().max()) if finite.numel() and float(finite.abs().max()) > 0 else 1.0
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * g.shape[1], 1.2 + 0.3 * g.shape[0]), constrained_layout=True)
    im = ax.imshow(g.numpy(), cmap="RdBu", vmin=-scale, vmax=scale, aspect="auto")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, label=label)
    fig.savefig(path, dpi=120)
    plt.close(fig)
