"""A static figure of one circuit for papers and slides (SVG, PDF or PNG; matplotlib, Agg backend).

Span columns run left to right, layers from the input (bottom) to the logits (top). Inside a column a
layer's heads are spread in a row with their query, key and value inputs just under them and the MLP
beside them. Solid edges are within-position edges (a node's output read at the same tokens), dashed
ones run inside attention, from a query, key or value input to its head's output; an edge's width
grows with |score|, blue when positive and red when negative, grey without a score of its own.

Large circuits are drawn with each layer's heads of a span merged into one node ("layers"), and no
more than `max_edges` edges, the largest by |score| (the caption says how many were left out).
SVG keeps its text as text (fonts named, not turned into paths), and PDF embeds TrueType fonts.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import PathPatch  # noqa: E402
from matplotlib.path import Path as MplPath  # noqa: E402

from ..devices import HOST  # noqa: E402
from ..errors import ParameterError, check_count  # noqa: E402
from ..fileio import atomic_path  # noqa: E402

FORMATS = (".svg", ".pdf", ".png")
AGGREGATES = ("auto", "none", "layers")
MAX_EDGES = 400

# Node kinds drawn: the edge table's, and "layer" for a span's heads of one layer merged into one node.
NODE_STYLE = {  # kind: (marker, size factor, colour, legend label)
    "head": ("o", 1.0, "#7c3aed", "attention head (aL.hH)"),
    "layer": ("o", 1.35, "#7c3aed", "a layer's heads and their q/k/v (aL)"),
    "mlp": ("s", 1.0, "#059669", "MLP (mL)"),
    "q": ("^", 1.05, "#d97706", "query input (q)"),
    "k": ("^", 1.05, "#0284c7", "key input (k)"),
    "v": ("^", 1.05, "#db2777", "value input (v)"),
    "input": ("s", 1.0, "#1f2937", "input / logits"),
    "logits": ("s", 1.0, "#1f2937", "input / logits"),
}
POSITIVE, NEGATIVE, UNSCORED = "#2563eb", "#dc2626", "#9ca3af"


def check_figure_path(path: str | os.PathLike) -> str:
    """The figure format of `path` by its suffix ("svg", "pdf" or "png"); ParameterError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ParameterError(f"{path}: a figure is written as SVG, PDF or PNG; give a path ending in "
                             f"{', '.join(FORMATS)} (not {suffix or 'no suffix'!r})")
    return suffix[1:]


def check_aggregate(aggregate: str) -> str:
    if aggregate not in AGGREGATES:
        raise ParameterError(f"unknown aggregate '{aggregate}'; choose one of {', '.join(AGGREGATES)}")
    return aggregate


def as_span_circuit(circuit):
    from ..circuits.circuit import Circuit
    from ..circuits.span_circuit import SpanCircuit

    if isinstance(circuit, SpanCircuit):
        return circuit
    if isinstance(circuit, Circuit):
        return SpanCircuit.from_circuit(circuit)
    raise ParameterError(f"a circuit figure draws a SpanCircuit or a Circuit, not {type(circuit).__name__}")


def check_scores_fit(circuit, scores) -> None:
    """ParameterError unless `scores` belong to a graph of `circuit`'s shape (other mismatches, of spans
    or query edges, are the edge table's CircuitError)."""
    if scores is None:
        return
    diff = scores.graph.differences(circuit.graph)
    if diff:
        raise ParameterError(f"the scores are for another graph than the circuit's ({'; '.join(diff)}; "
                             "scores first)")


# ------------------------------------------------------------------------------------------------
# What is drawn: nodes and edges after aggregation and the edge cap
# ------------------------------------------------------------------------------------------------


@dataclass
class FigureEdges:
    """The nodes and edges a figure draws. Edges are sorted by descending |score| (NaN last);
    `style` 0 is a within-position edge, 1 an edge inside attention (q/k/v input -> head)."""

    spans: tuple[str, ...]
    n_layers: int
    n_heads: int
    group_size: int
    labels: list[str]  # node label without its span: "a3.h2", "a3.g1.k", "a3", "m3", "input", "logits"
    kinds: list[str]  # NODE_STYLE keys
    layer: list[int]  # input -1, logits n_layers
    index: list[int]  # head (head, q), group (k, v); -1 otherwise
    span: list[int]
    parent: torch.Tensor  # int64 [n]
    child: torch.Tensor  # int64 [n]
    style: torch.Tensor  # int64 [n]
    score: torch.Tensor  # float64 [n], NaN: no score of its own
    aggregated: bool
    n_span_edges: int  # the circuit's span edges (before aggregation)
    n_attention_edges: int  # of which inside attention
    n_before_cap: int  # edges after aggregation, before the cap
    concrete: float | None  # concrete token-level edges per example, when known

    def __len__(self) -> int:
        return int(self.parent.numel())

    def names(self) -> list[str]:
        """Unique node names, "label@span"."""
        return [f"{label}@{self.spans[s]}" for label, s in zip(self.labels, self.span)]


def figure_edges(edges, aggregate: str = "auto", max_edges: int = MAX_EDGES) -> FigureEdges:
    """The figure's view of a circuit's `SpanEdges` (`circuit_edges([circuit], scores)`)."""
    from ..circuits.edge_table import NODE_KINDS

    check_aggregate(aggregate)
    check_count("max_edges", max_edges)
    n = len(edges)
    merge = aggregate == "layers" or (aggregate == "auto" and n > max_edges)
    nodes = edges.nodes
    kinds = [NODE_KINDS[k] for k in nodes.kind.tolist()]
    layers, index, spans = nodes.layer.tolist(), nodes.index.tolist(), nodes.span.tolist()
    g = edges.graph
    labels, new_kind, new_layer, new_index, new_span = [], [], [], [], []
    key_to_new: dict[tuple, int] = {}
    old_to_new = []
    for name, kind, l, i, s in zip(nodes.names, kinds, layers, index, spans):
        if merge and kind in ("head", "q", "k", "v"):
            key, label, kind, i = ("layer", l, s), f"a{l}", "layer", -1
        else:
            key, label = (name,), name.rsplit("@", 1)[0]
        if key not in key_to_new:
            key_to_new[key] = len(labels)
            labels.append(label)
            new_kind.append(kind)
            new_layer.append(l)
            new_index.append(i)
            new_span.append(s)
        old_to_new.append(key_to_new[key])
    remap = torch.tensor(old_to_new, dtype=torch.long, device=HOST)
    parent, child = remap[edges.parent.cpu()], remap[edges.child.cpu()]
    style = (edges.kind.cpu() != 0).long()
    score = edges.score.detach().cpu().double()
    if merge:  # sum the edges that now join the same two nodes in the same style; drop those inside a node
        keep = parent != child
        parent, child, style, score = parent[keep], child[keep], style[keep], score[keep]
        m = len(labels)
        key, inverse = torch.unique((parent * m + child) * 2 + style, return_inverse=True)
        finite = torch.isfinite(score)
        total = torch.zeros(len(key), dtype=torch.float64, device=HOST).index_add_(0, inverse, score.nan_to_num(0.0))
        scored = torch.zeros(len(key), dtype=torch.long, device=HOST).index_add_(0, inverse, finite.long())
        score = torch.where(scored > 0, total, torch.full_like(total, float("nan")))
        style, pc = key % 2, key // 2
        parent, child = pc // m, pc % m
    # descending |score|, NaN last; ties in a fixed order (by parent, child)
    order = _by_abs_score(score)
    parent, child, style, score = parent[order], child[order], style[order], score[order]
    n_before = int(parent.numel())
    if n_before > max_edges:
        parent, child, style, score = parent[:max_edges], child[:max_edges], style[:max_edges], score[:max_edges]
    concrete = edges.concrete.detach().cpu().double()
    known = bool(torch.isfinite(concrete).all()) and n > 0
    return FigureEdges(
        spans=tuple(edges.spans), n_layers=g.n_layers, n_heads=g.n_heads, group_size=g.group_size,
        labels=labels, kinds=new_kind, layer=new_layer, index=new_index, span=new_span,
        parent=parent, child=child, style=style, score=score, aggregated=merge, n_span_edges=n,
        n_attention_edges=int((edges.kind != 0).sum()), n_before_cap=n_before,
        concrete=float(concrete.sum()) if known else None,
    )


def _by_abs_score(score: torch.Tensor) -> torch.Tensor:
    key = score.abs().nan_to_num(nan=-1.0)
    return key.argsort(descending=True, stable=True)


# ------------------------------------------------------------------------------------------------
# Layout
# ------------------------------------------------------------------------------------------------

SLOT_LEFT, SLOT_RIGHT, MLP_X = 0.05, 0.80, 0.90  # fractions of a column's width
Q_DROP, KV_DROP, MLP_RISE = 0.26, 0.46, 0.22  # fractions of a layer's height
EMPTY_COLUMN = 0.3  # the width of a span column without nodes, in full columns


@dataclass
class Layout:
    x: list[float]
    y: list[float]
    max_slots: int  # the most head slots in one (span, layer) cell
    left: list[float]  # each span column's left edge
    width: list[float]  # each span column's width (1, or EMPTY_COLUMN without nodes)

    @property
    def total(self) -> float:
        return self.left[-1] + self.width[-1]


def layout(view: FigureEdges) -> Layout:
    """Data coordinates: a span column is 1 wide (EMPTY_COLUMN without nodes), left to right; the
    input sits at y = 0, layer l's heads at y = l + 1, the logits at y = n_layers + 1."""
    used = sorted(set(view.parent.tolist()) | set(view.child.tolist()))
    occupied = {view.span[i] for i in used}
    width = [1.0 if j in occupied else EMPTY_COLUMN for j in range(len(view.spans))]
    left = [sum(width[:j]) for j in range(len(width))]
    cells: dict[tuple[int, int], dict] = {}
    for i in used:
        kind = view.kinds[i]
        if kind in ("head", "layer", "q", "k", "v"):
            cell = cells.setdefault((view.span[i], view.layer[i]), {"heads": set(), "groups": set()})
            if kind in ("head", "q"):
                cell["heads"].add(view.index[i])
            elif kind == "layer":
                cell["heads"].add(-1)
            else:
                cell["groups"].add(view.index[i])
    slot_x: dict[tuple, float] = {}
    max_slots = 1
    for (s, l), cell in cells.items():
        gs = view.group_size
        heads = sorted(cell["heads"])
        lonely = sorted(g for g in cell["groups"] if not any(h // gs == g for h in heads if h >= 0))
        # heads in order, a key/value group with none of its heads drawn in its heads' place
        slots = sorted([(h, "h", h) for h in heads] + [(g * gs, "g", g) for g in lonely])
        n = len(slots)
        max_slots = max(max_slots, n)
        for k, (_, what, i) in enumerate(slots):
            slot_x[(s, l, what, i)] = left[s] + SLOT_LEFT + (SLOT_RIGHT - SLOT_LEFT) * (k + 0.5) / n
        for g in cell["groups"]:
            if (s, l, "g", g) not in slot_x:
                xs = [slot_x[(s, l, "h", h)] for h in heads if h >= 0 and h // gs == g]
                slot_x[(s, l, "g", g)] = sum(xs) / len(xs)
    x = [0.0] * len(view.labels)
    y = [0.0] * len(view.labels)
    spread = (SLOT_RIGHT - SLOT_LEFT) / max_slots * 0.32  # k left and v right of their group's centre
    for i in used:
        kind, s, l, idx = view.kinds[i], view.span[i], view.layer[i], view.index[i]
        if kind in ("input", "logits"):
            x[i], y[i] = left[s] + 0.5, (0.0 if kind == "input" else view.n_layers + 1.0)
        elif kind == "mlp":
            x[i], y[i] = left[s] + MLP_X, l + 1 + MLP_RISE
        elif kind == "layer":  # zigzag, so that edges skipping a layer pass beside its node
            x[i], y[i] = slot_x[(s, l, "h", -1)] + (0.12 if l % 2 else -0.12), l + 1.0
        elif kind in ("head", "q"):
            x[i], y[i] = slot_x[(s, l, "h", idx)], l + 1.0 - (Q_DROP if kind == "q" else 0.0)
        else:
            x[i] = slot_x[(s, l, "g", idx)] + (-spread if kind == "k" else spread)
            y[i] = l + 1.0 - KV_DROP
    return Layout(x, y, max_slots, left, width)


# ------------------------------------------------------------------------------------------------
# Drawing
# ------------------------------------------------------------------------------------------------


def _caption(view: FigureEdges, faithfulness: dict | None) -> str:
    within = view.n_span_edges - view.n_attention_edges
    size = (f"{view.n_span_edges:,} span edges ({within:,} within positions, {view.n_attention_edges:,} "
            "inside attention)")
    if view.concrete is not None:
        size += f"; {view.concrete:,.0f} concrete token-level edges per example"
    lines = [size]
    if faithfulness:
        parts = [f"{key} {faithfulness[key]:.3f}" for key in ("normalized", "soft", "hard")
                 if isinstance(faithfulness.get(key), (int, float)) and math.isfinite(faithfulness[key])]
        if parts:
            lines.append("faithfulness: " + ", ".join(parts))
    drawn = []
    if view.aggregated:
        drawn.append("each layer's heads merged per span (aL), edge scores summed")
    if view.n_before_cap > len(view):
        drawn.append(f"the top {len(view):,} of {view.n_before_cap:,} edges by |score| drawn")
    if drawn:
        lines.append("; ".join(drawn))
    return "\n".join(lines)


def _font_size(view: FigureEdges, lay: Layout) -> tuple[float, float, float, bool]:
    """(font size in points, column width and layer height in inches, staggered head labels): labels
    fit their slot at the largest size up to 8 pt, in span columns about 13 inches wide in all."""
    chars = max((len(label) for label, k in zip(view.labels, view.kinds) if k in ("head", "layer")), default=3)
    n_spans, max_slots = lay.total, lay.max_slots  # in full columns

    def column(fs: float, stagger: bool) -> float:  # inches for max_slots labels of `chars` at `fs`
        slot = chars * 0.62 * fs / 72 + 0.06
        return max(1.1, max_slots * slot / (SLOT_RIGHT - SLOT_LEFT) / (2 if stagger else 1) + 0.25)

    stagger, fs, widest = False, 8.0, 13.0
    while fs > 6.5 and n_spans * column(fs, stagger) > widest:
        fs -= 0.25
    if n_spans * column(fs, stagger) > widest and max_slots > 1:  # head labels on two alternating lines
        stagger, fs = True, 8.0
        while fs > 4.5 and n_spans * column(fs, stagger) > widest:
            fs -= 0.25
    # a layer holds a label line over its heads, the heads and, unless merged, two rows of inputs
    per_fs = (4.2 if view.aggregated else 6.2) + (2.2 if stagger else 0.0)
    while fs > 4.0 and (view.n_layers + 2) * per_fs * fs / 72 > 24:
        fs -= 0.25
    return fs, column(fs, stagger), max(0.36, per_fs * fs / 72), stagger


def draw(view: FigureEdges, title: str | None = None, faithfulness: dict | None = None):
    """The matplotlib figure of `view` (call inside `figure_rc()` for text kept as text)."""
    lay = layout(view)
    fs, col_in, row_in, stagger = _font_size(view, lay)
    n_spans, n_layers = len(view.spans), view.n_layers
    height = min(30.0, max(3.6, (n_layers + 2) * row_in + 1.6))
    width = lay.total * col_in + 1.2 + 2.5  # layer axis and legend
    fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
    ax.set_xlim(0, lay.total)
    ax.set_ylim(-0.45, n_layers + 1.45)
    x_in, y_in = col_in, (height - 1.6) / (n_layers + 1.9)  # inches per data unit, roughly

    # layer bands and column separators
    for l in range(0, n_layers, 2):
        ax.axhspan(l + 1 - 0.55, l + 1 + 0.45, color="#f3f4f6", zorder=0, lw=0)
    for j in range(1, n_spans):
        ax.axvline(lay.left[j], color="#d1d5db", lw=0.8, zorder=0)

    finite = view.score[torch.isfinite(view.score)].abs()
    top = float(finite.max()) if finite.numel() else 1.0
    top = top or 1.0
    alpha = 0.85 if len(view) <= 60 else max(0.45, 0.85 - 0.4 * (len(view) - 60) / 340)
    draw_order = reversed(range(len(view)))  # weakest first, the strongest on top
    parents, children, styles = view.parent.tolist(), view.child.tolist(), view.style.tolist()
    scores = view.score.tolist()
    for e in draw_order:
        p, c, s = parents[e], children[e], scores[e]
        x0, y0, x1, y1 = lay.x[p], lay.y[p], lay.x[c], lay.y[c]
        # a gentle bend (in inches, so it looks the same at any aspect) keeps edges off the nodes between
        dx, dy = (x1 - x0) * x_in, (y1 - y0) * y_in
        length = math.hypot(dx, dy) or 1.0
        bend = min(0.12 * length, 0.3) * (1 if styles[e] == 0 else -1) / length
        cx = (x0 + x1) / 2 - bend * dy / x_in
        cy = (y0 + y1) / 2 + bend * dx / y_in
        path = MplPath([(x0, y0), (cx, cy), (x1, y1)], [MplPath.MOVETO, MplPath.CURVE3, MplPath.CURVE3])
        scored = math.isfinite(s)
        color = UNSCORED if not scored else (POSITIVE if s >= 0 else NEGATIVE)
        lw = 0.5 + 3.0 * abs(s) / top if scored else 0.6
        patch = PathPatch(path, fill=False, edgecolor=color, lw=lw, alpha=alpha, zorder=1,
                          linestyle="-" if styles[e] == 0 else (0, (3, 2)), capstyle="round")
        patch.set_gid(f"edge-{e}")
        ax.add_patch(patch)

    used = sorted(set(parents) | set(children))
    marker_pt = fs * 1.15
    head_slots: dict[tuple, int] = {}
    for i in sorted(used, key=lambda i: (view.span[i], view.layer[i], lay.x[i])):
        kind = view.kinds[i]
        marker, factor, color, _ = NODE_STYLE[kind]
        x, y = lay.x[i], lay.y[i]
        gid = f"node-{view.labels[i]}@{view.spans[view.span[i]]}"
        if kind in ("input", "logits"):
            t = ax.text(x, y, view.labels[i], ha="center", va="center", fontsize=fs, color="white", zorder=4,
                        bbox=dict(boxstyle="round,pad=0.3", fc=color, ec="none"))
            t.set_gid(gid)
            continue
        (pt,) = ax.plot([x], [y], marker=marker, ms=marker_pt * factor, color=color, mec="white", mew=0.6,
                        zorder=3, ls="none")
        pt.set_gid(gid)
        if kind in ("q", "k", "v"):
            ax.text(x, y + 0.012 * fs / 8, kind, ha="center", va="center", fontsize=fs * 0.62, color="white",
                    zorder=4, fontweight="bold")
            continue
        cell = (view.span[i], view.layer[i])
        k = head_slots.get(cell, 0)
        head_slots[cell] = k + 1
        # just above the marker; every other head label of a crowded row one line higher
        lift = (marker_pt * factor / 2 + 1.5) / 72
        if stagger and kind == "head" and k % 2:
            lift += fs * 1.25 / 72
        ax.text(x, y + lift / y_in, view.labels[i], ha="center", va="bottom", fontsize=fs, color="#111827",
                zorder=5, bbox=dict(boxstyle="round,pad=0.08", fc="white", ec="none", alpha=0.75))

    # axes: spans on top, layers on the left
    ax.xaxis.tick_top()
    names = [s if s != "*" else "all positions" for s in view.spans]
    turn = max(len(s) for s in names) * (fs + 1) * 0.6 / 72 > col_in * 0.9
    ax.set_xticks([lay.left[j] + lay.width[j] / 2 for j in range(n_spans)], names, fontsize=fs + 1)
    for j, tick in enumerate(ax.get_xticklabels()):  # a column without nodes: its name upright and grey
        empty = lay.width[j] < 1
        tick.set_rotation(90 if empty else (30 if turn else 0))
        tick.set_color("#9ca3af" if empty else "#111827")
        tick.set_ha("center" if empty or not turn else "left")
    ax.tick_params(axis="x", length=0)
    ticks = list(range(n_layers + 2))
    step = 1 if n_layers <= 16 else 2
    labels = ["input"] + [str(l) if l % step == 0 else "" for l in range(n_layers)] + ["logits"]
    ax.set_yticks(ticks, labels, fontsize=fs + 0.5)
    ax.set_ylabel("layer", fontsize=fs + 1.5)
    for side in ("right", "bottom"):
        ax.spines[side].set_visible(False)
    ax.set_xlabel(_caption(view, faithfulness), fontsize=fs + 0.5, loc="left", labelpad=8)
    ax.xaxis.set_label_position("bottom")
    if title:
        ax.set_title(title, fontsize=fs + 3, pad=12)
    fig.legend(handles=_legend_handles(view, top, fs), loc="outside right upper", fontsize=fs + 0.5,
               frameon=False, handlelength=2.4)
    return fig


def _legend_handles(view: FigureEdges, top: float, fs: float) -> list:
    handles = []
    kinds = ["layer"] if view.aggregated else ["head"]
    kinds += ["mlp"] + ([] if view.aggregated else ["q", "k", "v"]) + ["input"]
    for kind in kinds:
        marker, factor, color, label = NODE_STYLE[kind]
        handles.append(Line2D([], [], marker=marker, ms=fs * 1.15 * factor, color=color, mec="white", ls="none",
                              label=label))
    handles += [
        Line2D([], [], color=POSITIVE, lw=2, label="positive score"),
        Line2D([], [], color=NEGATIVE, lw=2, label="negative score"),
        Line2D([], [], color=UNSCORED, lw=1, label="no score of its own"),
        Line2D([], [], color="#374151", lw=1.2, label="within position"),
        Line2D([], [], color="#374151", lw=1.2, ls=(0, (3, 2)), label="inside attention (q/k/v -> head)"),
    ]
    if bool(torch.isfinite(view.score).any()):
        handles += [Line2D([], [], color="#374151", lw=0.5 + 3.0 * 0.25, label=f"|score| {0.25 * top:.3g}"),
                    Line2D([], [], color="#374151", lw=3.5, label=f"|score| {top:.3g} (largest drawn)")]
    return handles


def figure_rc():
    """rc settings of a figure: text kept as text in SVG, TrueType (Type 42) fonts embedded in PDF."""
    return matplotlib.rc_context({"svg.fonttype": "none", "pdf.fonttype": 42, "font.family": "DejaVu Sans",
                                  "axes.linewidth": 0.8})


def circuit_figure(circuit, path: str | os.PathLike, *, scores=None, counts: dict | None = None,
                   aggregate: str = "auto", max_edges: int = MAX_EDGES, title: str | None = None,
                   faithfulness: dict | None = None) -> Path:
    """Write a figure of `circuit` (a SpanCircuit or a non-positional Circuit, drawn as one column) to
    `path`, as SVG, PDF or PNG by its suffix. `scores` (EdgeScores of the circuit's graph) give edge
    colours and widths; `counts` (the `concrete` layout of scores) the concrete size in the caption;
    `faithfulness` ({"normalized", "soft", "hard"}) is quoted in the caption. `aggregate`: "none"
    (every head), "layers" (a layer's heads of one span merged) or "auto" (layers when the circuit has
    more than `max_edges` edges); at most `max_edges` edges are drawn, the largest by |score|. The
    file is written whole or not at all."""
    from ..circuits.edge_table import circuit_edges

    path = Path(path)
    fmt = check_figure_path(path)
    check_aggregate(aggregate)
    check_count("max_edges", max_edges)
    span_circuit = as_span_circuit(circuit)
    check_scores_fit(span_circuit, scores)
    if scores is not None and scores.graph is not span_circuit.graph:
        # the same shape (checked): share one Graph object, as the edge table compares graphs with `!=`,
        # which a Graph's tensor fields make ambiguous between two equal graphs loaded apart
        span_circuit = dataclasses.replace(span_circuit, graph=scores.graph)
    view = figure_edges(circuit_edges([span_circuit], scores, counts), aggregate, max_edges)
    with figure_rc():
        fig = draw(view, title=title, faithfulness=faithfulness)
        try:
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=fmt, dpi=200 if fmt == "png" else None,
                            metadata={"Date": None} if fmt == "svg" else None)
        finally:
            plt.close(fig)
    return path


__all__ = ["AGGREGATES", "FORMATS", "FigureEdges", "check_figure_path", "circuit_figure", "draw", "figure_edges",
           "layout"]
