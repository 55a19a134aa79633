"""Scores and circuits for other tools: pandas tables, networkx graphs, graphviz DOT text.

All three read the span-graph edge table (`edge_table`), so every export names nodes and edges alike:
nodes `input@S`, `a3.h2@S` (a head's output), `m3@S` (an MLP, input and output), `a3.h2.q@S`,
`a3.g1.k@S`, `a3.g1.v@S`, `logits@S` (S a span; `*` for non-positional scores and circuits); a
crossing edge runs from a head's query, key or value input node to the head's output node.

A non-positional `Circuit` is shown as the one-span graph of exactly its edges (not pruned), plus the
crossing edges inside each of its heads from every input node of the head that a circuit edge reads
(non-positional evaluation keeps every crossing edge, so a head reads whichever of its inputs the
circuit feeds).
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ..devices import HOST
from .circuit import Circuit, CircuitError
from .edge_table import KINDS, NODE_KINDS, SpanEdges, circuit_edges, score_edges
from .span_circuit import ALL_TOKENS, SpanCircuit

FRAME_COLUMNS = ("edge", "parent", "child", "type", "parent_span", "child_span", "key_span", "score", "concrete")


# ------------------------------------------------------------------------------------------------
# The circuits and scores the edge table is read from
# ------------------------------------------------------------------------------------------------


def span_view(circuit: Circuit | SpanCircuit) -> SpanCircuit:
    """`circuit` as a span circuit over its own edges: a SpanCircuit as it is, a Circuit as one span
    holding exactly its edges, with the crossing edges of its heads between nodes the circuit uses."""
    if isinstance(circuit, SpanCircuit):
        return circuit
    if not isinstance(circuit, Circuit):
        raise CircuitError(f"not a circuit: {type(circuit).__name__}")
    g = circuit.graph
    read = torch.zeros(g.n_downstream, dtype=torch.bool, device=HOST)
    read[g.edge_down[circuit.edges]] = True
    sent = torch.zeros(g.n_upstream, dtype=torch.bool, device=HOST)
    sent[g.edge_up[circuit.edges]] = True
    heads = torch.stack([sent[g.upstream_slice(l)] for l in range(g.n_layers)])  # [L, H]

    def inputs(slice_of) -> torch.Tensor:  # [L, H]: the head's input (its group's for k, v) is read
        x = torch.stack([read[slice_of(l)] for l in range(g.n_layers)])
        return x.repeat_interleave(g.n_heads // x.shape[1], dim=1)

    crossing = {kind: (heads & inputs(slice_of))[:, :, None, None].clone()
                for kind, slice_of in (("k", g.k_slice), ("v", g.v_slice), ("q", g.q_slice))}
    scores = None
    if circuit.scores is not None:
        scores = {"within": circuit.scores[None].clone(),
                  **{k: torch.full(v.shape, math.nan, dtype=torch.float64, device=HOST) for k, v in crossing.items()}}
    return SpanCircuit(g, (ALL_TOKENS,), circuit.edges[None].clone(), crossing,
                       torch.ones(1, dtype=torch.bool, device=HOST), model=circuit.model, method=circuit.method,
                       info=dict(circuit.info, positional=False), task=circuit.task, scores=scores)


def _scores_for(view: SpanCircuit, scores):
    """EdgeScores to look `view`'s edges up in: `scores` (checked against the circuit's graph;
    positional scores for a non-positional circuit are summed over spans), else the circuit's own
    scores, else None."""
    from ..attribution.scores import EdgeScores

    if scores is None:
        if view.scores is None:
            return None
        values = view.scores["within"]
        positional = not view.single_span or view.info.get("positional", True)
        return EdgeScores(view.graph, values if positional else values[0], view.method, "", "", view.model, 0,
                          spans=view.spans if positional else (),
                          crossing={k: view.scores[k] for k in ("k", "v", "q")} if positional else {})
    if not scores.graph.same_shape(view.graph):
        raise CircuitError(f"scores of another graph ({', '.join(scores.graph.differences(view.graph))}: the "
                           "scores' vs the circuit's)")
    changes = {"graph": view.graph}  # the same shape: share the circuit's graph object
    if scores.positional and view.single_span and not view.info.get("positional", True):
        changes.update(values=scores.edge_scores(), spans=(), crossing={}, concrete={})
    return dataclasses.replace(scores, **changes)


def edges_of(circuit: Circuit | SpanCircuit, scores=None) -> SpanEdges:
    """The span edges of `circuit` with their scores (from `scores`, else the circuit's own) and
    concrete counts (from positional scores), largest |score| first."""
    view = span_view(circuit)
    return circuit_edges([view], _scores_for(view, scores))


# ------------------------------------------------------------------------------------------------
# pandas
# ------------------------------------------------------------------------------------------------


def edge_frame(edges: SpanEdges):
    """A pandas DataFrame with one row per edge, columns FRAME_COLUMNS: `edge` (unique name), `parent`,
    `child` (node names), `type` (within, k, v, q), `parent_span`, `child_span`, `key_span` (per-key
    query edges only, else None), `score` and `concrete` (NaN where unknown)."""
    import numpy as np
    import pandas as pd

    spans = np.array(list(edges.spans) + [None], dtype=object)  # index -1: no span
    names = np.array(edges.nodes.names, dtype=object)
    node_span = edges.nodes.span.numpy()
    parent, child = edges.parent.numpy(), edges.child.numpy()
    per_key_q = ((edges.kind == KINDS.index("q")) & (edges.key_span >= 0)).numpy()
    key_span = spans[np.where(per_key_q, edges.key_span.numpy(), -1)]
    return pd.DataFrame({
        "edge": edges.names(),
        "parent": names[parent],
        "child": names[child],
        "type": pd.Categorical.from_codes(edges.kind.numpy(), categories=KINDS),
        "parent_span": spans[node_span[parent]],
        "child_span": spans[node_span[child]],
        "key_span": pd.Series(key_span, dtype=object),  # None (not NaN) where there is none
        "score": edges.score.numpy(),
        "concrete": edges.concrete.numpy(),
    }, columns=list(FRAME_COLUMNS))


def scores_frame(scores):
    """Every edge of `scores`' span graph as a DataFrame (`edge_frame`). Non-positional scores (eap,
    eap-ig, exact) give one span `*` and their within edges only: crossing edges have no score there."""
    edges = score_edges(scores)
    if not scores.positional:
        edges = edges.take(edges.kind == KINDS.index("within"))
    return edge_frame(edges)


def circuit_frame(circuit: Circuit | SpanCircuit, scores=None):
    """The circuit's edges as a DataFrame (`edge_frame`), scored by `scores` or the circuit's own."""
    return edge_frame(edges_of(circuit, scores))


# ------------------------------------------------------------------------------------------------
# networkx
# ------------------------------------------------------------------------------------------------


def _node_attributes(edges: SpanEdges, i: int) -> dict:
    n = edges.nodes
    attrs = {"kind": NODE_KINDS[int(n.kind[i])], "layer": int(n.layer[i]), "span": edges.spans[int(n.span[i])]}
    if int(n.index[i]) >= 0:
        attrs["index"] = int(n.index[i])
    return attrs


def to_networkx(circuit: Circuit | SpanCircuit, scores=None):
    """The circuit as a networkx.DiGraph over the export node names. Node attributes: kind, layer,
    span (and index: the head, or the key-value group). Edge attributes: type (within, k, v, q), score
    (when known), concrete (when known). A per-key query edge is one edge per key span in the span
    graph; here the query input -> head edge is one DiGraph edge with `key_spans` (comma-separated) and
    score and concrete summed over its key spans."""
    import networkx as nx

    edges = edges_of(circuit, scores)
    graph = nx.DiGraph(name=f"{circuit.method or 'circuit'} circuit", model=circuit.model, method=circuit.method,
                       task=getattr(circuit, "task", ""), spans=",".join(edges.spans))
    names = edges.nodes.names
    for i in sorted(set(edges.parent.tolist()) | set(edges.child.tolist())):
        graph.add_node(names[i], **_node_attributes(edges, i))
    for p, c, k, a, s, x in zip(edges.parent.tolist(), edges.child.tolist(), edges.kind.tolist(),
                                edges.key_span.tolist(), edges.score.tolist(), edges.concrete.tolist()):
        u, v = names[p], names[c]
        if KINDS[k] == "q" and a >= 0:  # per-key query edge: merged over key spans
            data = graph.get_edge_data(u, v)
            if data is None:
                graph.add_edge(u, v, type="q", key_spans=edges.spans[a])
            else:
                data["key_spans"] += f",{edges.spans[a]}"
            data = graph.edges[u, v]
            for key, value in (("score", s), ("concrete", x)):
                if not math.isnan(value):
                    data[key] = data.get(key, 0.0) + value
            continue
        attrs = {"type": KINDS[k]}
        if not math.isnan(s):
            attrs["score"] = s
        if not math.isnan(x):
            attrs["concrete"] = x
        graph.add_edge(u, v, **attrs)
    return graph


# ------------------------------------------------------------------------------------------------
# graphviz DOT
# ------------------------------------------------------------------------------------------------

_COLOURS = {"within": "gray40", "q": "#1f77b4", "k": "#2ca02c", "v": "#d62728"}
_SHAPES = {"input": "box", "head": "ellipse", "mlp": "box", "q": "point", "k": "point", "v": "point", "logits": "box"}


def quote(text: str) -> str:
    """`text` as a DOT quoted string."""
    return '"' + str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def _rank(kind: str, layer: int) -> int:
    """Bottom-up order of a node: the input, then per layer the head inputs, the heads, the MLP; then
    the logits."""
    if kind == "input":
        return 0
    if kind == "logits":
        return 3 * layer + 1
    return 3 * layer + {"q": 1, "k": 1, "v": 1, "head": 2, "mlp": 3}[kind]


def to_dot(circuit: Circuit | SpanCircuit, scores=None) -> str:
    """The circuit as graphviz DOT text (render with `dot -Tsvg`): one line per span edge (per-key
    query edges one per key span, labelled with it), nodes ranked by layer from the input at the bottom
    to the logits at the top, edges coloured by type and labelled with their scores when known."""
    edges = edges_of(circuit, scores)
    names = edges.nodes.names
    used = sorted(set(edges.parent.tolist()) | set(edges.child.tolist()))
    title = f"{circuit.method or 'circuit'} circuit" + (f" of {circuit.model}" if circuit.model else "")
    lines = [f"digraph {quote(title)} {{", "  rankdir=BT;", "  node [fontname=Helvetica, fontsize=10];",
             "  edge [fontname=Helvetica, fontsize=8];"]
    by_rank: dict[int, list[str]] = {}
    for i in used:
        attrs = _node_attributes(edges, i)
        by_rank.setdefault(_rank(attrs["kind"], attrs["layer"]), []).append(names[i])
        shape = _SHAPES[attrs["kind"]]
        label = f"xlabel={quote(names[i])}" if shape == "point" else f"label={quote(names[i])}"
        lines.append(f"  {quote(names[i])} [shape={shape}, {label}];")
    for rank in sorted(by_rank):
        lines.append("  { rank=same; " + " ".join(f"{quote(n)};" for n in by_rank[rank]) + " }")
    finite = edges.score[~edges.score.isnan()].abs()
    top = float(finite.max()) if finite.numel() else 0.0
    for p, c, k, a, s in zip(edges.parent.tolist(), edges.child.tolist(), edges.kind.tolist(),
                             edges.key_span.tolist(), edges.score.tolist()):
        kind = KINDS[k]
        attrs = [f"color={quote(_COLOURS[kind])}"]
        label = [] if math.isnan(s) else [f"{s:.3g}"]
        if kind == "q" and a >= 0:
            label.append(f"keys@{edges.spans[a]}")
        if label:
            attrs.append(f"label={quote(' '.join(label))}")
        if not math.isnan(s) and top > 0:
            attrs.append(f"penwidth={0.5 + 3.5 * abs(s) / top:.2f}")
        lines.append(f"  {quote(names[p])} -> {quote(names[c])} [{', '.join(attrs)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------
# Files (`mechscope export`)
# ------------------------------------------------------------------------------------------------

EXPORT_FORMATS = ("eapig", "dot", "graphml", "csv")


def check_export(circuit, to: str) -> None:
    """ParameterError for an unknown format, CircuitError for a span circuit to EAP-IG (before any work)."""
    from ..errors import ParameterError

    if to not in EXPORT_FORMATS:
        raise ParameterError(f"unknown export format '{to}'; choose one of {', '.join(EXPORT_FORMATS)}")
    if to == "eapig":
        from .eapig import _refuse_span_circuit

        _refuse_span_circuit(circuit)


def export_circuit(circuit: Circuit | SpanCircuit, to: str, out, scores=None, d_model: int | None = None):
    """Write `circuit` to `out` (atomically) as `to`: eapig (EAP-IG's graph JSON), dot (graphviz),
    graphml (networkx's writer) or csv (the edge table, `circuit_frame`). Returns the path."""
    from pathlib import Path

    from ..fileio import atomic_path

    check_export(circuit, to)
    out = Path(out)
    if to == "eapig":
        from .eapig import save_eapig

        return save_eapig(circuit, out, scores, d_model)
    if to == "dot":
        text = to_dot(circuit, scores)
    elif to == "graphml":
        graph = to_networkx(circuit, scores)
    else:
        frame = circuit_frame(circuit, scores)
    with atomic_path(out) as tmp:
        if to == "dot":
            tmp.write_text(text)
        elif to == "graphml":
            import networkx as nx

            nx.write_graphml(graph, tmp)
        else:
            frame.to_csv(tmp, index=False)
    return out
