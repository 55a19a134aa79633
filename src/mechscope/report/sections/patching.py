"""The activation patching section: an interactive heatmap of a `PatchResult` (drawn by
assets/patching.js: one row per layer, one column per position or head, or per (head, position) with
head blocks; diverging colours centred at 0; a tooltip per cell; a select for the mean or one example),
and `heatmap_png`, the same picture as a static PNG (matplotlib)."""

from __future__ import annotations

import html

import numpy as np

from ..page import Section, column


def _grid(values: np.ndarray, axes: tuple[str, ...]) -> np.ndarray:
    """[..., layer, columns]: the cells after the layer axis flattened into columns."""
    return values.reshape(values.shape[: values.ndim - len(axes) + 1] + (-1,))


def _column_labels(result) -> list[str]:
    if len(result.axes) == 3:  # (layer, head, position)
        return [f"{h} {p}" for h in result.labels[1] for p in result.labels[2]]
    return list(result.labels[1])


def section(result, title: str | None = None) -> Section:
    """The "patching" section of `result` (a PatchResult)."""
    meta = result.meta
    mean = _grid(result.mean.numpy(), result.axes)
    per = _grid(result.values.numpy(), result.axes)
    what = (f"{meta.get('component')} · {meta.get('direction')} · reference {meta.get('reference')} · metric "
            f"{meta.get('metric')} · {result.n_examples} examples · positions by {meta.get('positions')}")
    if meta.get("estimate"):
        what += " · attribution-patching estimate"
    norm = ("(M_patched − M(x′)) / (M(x) − M(x′))" if meta.get("direction") == "denoising"
            else "(M(x) − M_patched) / (M(x) − M(x′))")
    body = (f'<p class="note">{html.escape(what)}. Values are normalised: {html.escape(norm)}; 0 is no effect, 1 '
            "the full clean-vs-counterfactual effect. The mean is the normalised effect of the example means.</p>"
            '<div class="controls"><label>show <select id="patching-which"></select></label>'
            '<span id="patching-range" class="note"></span></div>'
            '<div class="patching-wrap"><svg id="patching-heatmap"></svg></div>')
    data = {
        "rows": list(result.labels[0]),
        "cols": _column_labels(result),
        "group": len(result.labels[2]) if len(result.axes) == 3 else 0,
        "axes": list(result.axes),
        "n_examples": result.n_examples,
        "mean": column(mean.reshape(-1), "f32"),
        "examples": column(per.reshape(-1), "f32"),
        "metric_clean": result.metric_clean.tolist(),
        "metric_counterfactual": result.metric_counterfactual.tolist(),
    }
    return Section(id="patching", title=title or "Activation patching", html=body, data=data,
                   assets=("patching.js", "patching.css"))


def heatmap_png(result, path, title: str | None = None) -> None:
    """The mean effect as a PNG heatmap: layers as rows, positions / heads as columns, labelled axes,
    a diverging colour map centred at 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid = _grid(result.mean.numpy(), result.axes)
    cols = _column_labels(result)
    finite = np.abs(grid[np.isfinite(grid)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    width = min(40.0, 2.5 + 0.28 * len(cols))
    height = min(30.0, 1.8 + 0.26 * len(result.labels[0]))
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -lim, lim), aspect="auto")
    ax.set_yticks(range(len(result.labels[0])), result.labels[0], fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    if len(result.axes) == 3:
        for k in range(1, len(result.labels[1])):
            ax.axvline(k * len(result.labels[2]) - 0.5, color="#888", linewidth=0.5)
    ax.set_ylabel("layer")
    ax.set_xlabel(" × ".join(result.axes[1:]))
    meta = result.meta
    ax.set_title(title or f"{meta.get('component')} {meta.get('direction')} ({meta.get('reference')}), "
                          f"mean of {result.n_examples} examples", fontsize=9)
    fig.colorbar(im, ax=ax, label="normalised effect")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
