"""Span-graph edges as columns: the one enumeration that the report's circuit viewer, the edge-score
tables (`EdgeScores.to_frame`), the exports and the static figures read.

A span graph (docs/method.md §4) has within-position edges (a graph edge at one span) and crossing
edges inside attention (a head's key, value or query input at one span feeding the head at another).
Each is one row here: its kind, its head and spans, its score, the concrete token-level edges it stands
for, and its two end nodes. Everything is computed with tensor operations over a canonical flat index
of the span graph, so the 660k edges of SmolLM2's span graph take well under a second.

Node names: `input@S`, `a3.h2@S` (a head's output), `m3@S` (an MLP, input and output in one node),
`a3.h2.q@S` (a head's query input), `a3.g1.k@S` / `a3.g1.v@S` (a key-value group's inputs), `logits@S`;
S is the span's name (`*` for non-positional circuits).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..devices import HOST
from ..graph import Graph
from .circuit import Circuit, CircuitError
from .span_circuit import SpanCircuit

KINDS = ("within", "k", "v", "q")
NODE_KINDS = ("input", "head", "mlp", "q", "k", "v", "logits")
_INPUT, _HEAD, _MLP, _Q, _K, _V, _LOGITS = range(len(NODE_KINDS))


@dataclass
class Nodes:
    """The end nodes of a set of span edges, as columns."""

    names: list[str]
    kind: torch.Tensor  # int64 [M], index into NODE_KINDS
    layer: torch.Tensor  # int64 [M]; input -1, logits n_layers
    index: torch.Tensor  # int64 [M]; head (head, q nodes) or key-value group (k, v nodes); -1 otherwise
    span: torch.Tensor  # int64 [M]

    def __len__(self) -> int:
        return len(self.names)


@dataclass
class SpanEdges:
    """N edges of one span graph as columns (see the module docstring)."""

    graph: Graph
    spans: tuple[str, ...]
    query_edges: str  # per_key | whole_row
    kind: torch.Tensor  # int64 [N], index into KINDS
    layer: torch.Tensor  # int64 [N]; crossing edges: the head's layer; within: -1
    head: torch.Tensor  # int64 [N]; crossing edges: the (query) head; within: -1
    edge: torch.Tensor  # int64 [N]; within edges: the Graph edge; crossing: -1
    span: torch.Tensor  # int64 [N]; the child's span (the query span of a crossing edge)
    key_span: torch.Tensor  # int64 [N]; k, v and per-key q edges: the key span; otherwise -1
    score: torch.Tensor  # float64 [N]; NaN where the edge has no score of its own
    concrete: torch.Tensor  # float64 [N]; concrete token-level edges per example; NaN where unknown
    member: torch.Tensor  # int64 [N]; bit i: the edge is in circuit i of the union it came from
    parent: torch.Tensor  # int64 [N], index into nodes
    child: torch.Tensor  # int64 [N], index into nodes
    nodes: Nodes

    _COLUMNS = ("kind", "layer", "head", "edge", "span", "key_span", "score", "concrete", "member", "parent", "child")

    def __len__(self) -> int:
        return int(self.kind.numel())

    def take(self, index: torch.Tensor) -> "SpanEdges":
        """The edges at `index` (positions or a bool mask), with the same node table."""
        cols = {name: getattr(self, name)[index] for name in self._COLUMNS}
        return SpanEdges(self.graph, self.spans, self.query_edges, nodes=self.nodes, **cols)

    def in_circuit(self, i: int) -> "SpanEdges":
        """The edges of circuit `i` of the union these edges came from."""
        return self.take((self.member >> i) & 1 == 1)

    def names(self) -> list[str]:
        """One unique name per edge: `parent->child`, with `[keys@S]` after a per-key query edge."""
        node = self.nodes.names
        out = [f"{node[p]}->{node[c]}" for p, c in zip(self.parent.tolist(), self.child.tolist())]
        q = (self.kind == KINDS.index("q")) & (self.key_span >= 0)
        for i, a in zip(q.nonzero().flatten().tolist(), self.key_span[q].tolist()):
            out[i] += f"[keys@{self.spans[a]}]"
        return out

    def sorted_by_score(self) -> "SpanEdges":
        """The same edges, largest |score| first (edges without a score last), ties in index order."""
        key = torch.where(self.score.isnan(), torch.full_like(self.score, -1.0), self.score.abs())
        return self.take(torch.sort(key, descending=True, stable=True).indices)


# ------------------------------------------------------------------------------------------------
# The canonical flat index of a span graph: within [S, E], then k, v [L, H, S, S], then q
# ([L, H, S, S] per key, [L, H, S] whole row).
# ------------------------------------------------------------------------------------------------


def _flat(c: SpanCircuit) -> torch.Tensor:
    return torch.cat([c.within.flatten(), c.crossing["k"].flatten(), c.crossing["v"].flatten(),
                      c.crossing["q"].flatten()])


def _check_same_graph(circuits: Sequence[SpanCircuit]) -> None:
    first = circuits[0]
    for i, c in enumerate(circuits[1:], 1):
        if c.graph != first.graph or c.spans != first.spans or c.query_edges != first.query_edges:
            raise CircuitError(
                f"circuit {i} is over another span graph than circuit 0 "
                f"(graph {c.graph.spec()} spans {list(c.spans)} query edges {c.query_edges} vs "
                f"{first.graph.spec()} {list(first.spans)} {first.query_edges})")


def _decode(flat: torch.Tensor, g: Graph, n_spans: int, query_edges: str) -> dict[str, torch.Tensor]:
    """Columns kind, layer, head, edge, span, key_span of the flat positions `flat`."""
    S, E, L, H = n_spans, g.n_edges, g.n_layers, g.n_heads
    n_within, n_pair = S * E, L * H * S * S
    minus = torch.full_like(flat, -1)
    kind = torch.zeros_like(flat)
    layer, head, edge, span, key_span = minus.clone(), minus.clone(), minus.clone(), minus.clone(), minus.clone()

    w = flat < n_within
    span[w], edge[w] = flat[w] // E, flat[w] % E
    for code, lo in ((1, n_within), (2, n_within + n_pair)):
        m = (flat >= lo) & (flat < lo + n_pair)
        x = flat[m] - lo
        kind[m], layer[m], head[m] = code, x // (H * S * S), (x // (S * S)) % H
        key_span[m], span[m] = (x // S) % S, x % S
    m = flat >= n_within + 2 * n_pair
    x = flat[m] - (n_within + 2 * n_pair)
    kind[m] = 3
    if query_edges == "per_key":
        layer[m], head[m], key_span[m], span[m] = x // (H * S * S), (x // (S * S)) % H, (x // S) % S, x % S
    else:
        layer[m], head[m], span[m] = x // (H * S), (x // S) % H, x % S
    return {"kind": kind, "layer": layer, "head": head, "edge": edge, "span": span, "key_span": key_span}


def _node_tables(g: Graph) -> tuple[torch.Tensor, ...]:
    """(kind, layer, index) of every upstream and every downstream node of `g`."""
    up = torch.tensor([_up_node(name) for name in g.upstream_names], dtype=torch.long, device=HOST)
    down = torch.tensor([_down_node(name, g.n_layers) for name in g.downstream_names], dtype=torch.long, device=HOST)
    return up[:, 0], up[:, 1], up[:, 2], down[:, 0], down[:, 1], down[:, 2]


def _up_node(name: str) -> tuple[int, int, int]:
    if name == "input":
        return _INPUT, -1, -1
    if name.startswith("m"):
        return _MLP, int(name[1:]), -1
    layer, head = name.split(".")
    return _HEAD, int(layer[1:]), int(head[1:])


def _down_node(name: str, n_layers: int) -> tuple[int, int, int]:
    if name == "logits":
        return _LOGITS, n_layers, -1
    if name.endswith(".in"):  # an MLP's input: the same node as its output
        return _MLP, int(name[1:-3]), -1
    layer, owner, role = name.split(".")
    return {"q": _Q, "k": _K, "v": _V}[role], int(layer[1:]), int(owner[1:])


def _ends(cols: dict[str, torch.Tensor], g: Graph) -> tuple[torch.Tensor, ...]:
    """(kind, layer, index, span) of each edge's parent and of its child."""
    up_kind, up_layer, up_index, down_kind, down_layer, down_index = _node_tables(g)
    kind, layer, head, span, key_span = cols["kind"], cols["layer"], cols["head"], cols["span"], cols["key_span"]
    w = kind == 0
    e = cols["edge"].clamp(min=0)
    u, v = g.edge_up[e], g.edge_down[e]
    # Crossing edges: k / v come from the key-value group's input at the key span, q from the head's
    # query input at the query span; all enter the head's output node at the query span.
    cross_kind = torch.tensor([0, _K, _V, _Q], dtype=torch.long, device=HOST)[kind]
    cross_index = torch.where(kind == 3, head, head.div(g.group_size, rounding_mode="floor"))
    cross_span = torch.where(kind == 3, span, key_span)
    p = (torch.where(w, up_kind[u], cross_kind), torch.where(w, up_layer[u], layer),
         torch.where(w, up_index[u], cross_index), torch.where(w, span, cross_span))
    c = (torch.where(w, down_kind[v], torch.full_like(kind, _HEAD)), torch.where(w, down_layer[v], layer),
         torch.where(w, down_index[v], head), span)
    return p, c


def _node_names(kind, layer, index, span, spans) -> list[str]:
    out = []
    for k, l, i, s in zip(kind.tolist(), layer.tolist(), index.tolist(), span.tolist()):
        if k == _INPUT:
            base = "input"
        elif k == _LOGITS:
            base = "logits"
        elif k == _MLP:
            base = f"m{l}"
        elif k == _HEAD:
            base = f"a{l}.h{i}"
        elif k == _Q:
            base = f"a{l}.h{i}.q"
        else:
            base = f"a{l}.g{i}.{'k' if k == _K else 'v'}"
        out.append(f"{base}@{spans[s]}")
    return out


def _index_nodes(parent: tuple, child: tuple, g: Graph, spans: tuple[str, ...]):
    """(Nodes, parent index, child index) with one node per distinct (kind, layer, index, span)."""
    n_index = max(g.n_heads, g.n_kv_heads) + 1
    n_spans = len(spans)

    def code(kind, layer, index, span):
        return ((kind * (g.n_layers + 2) + layer + 1) * n_index + index + 1) * n_spans + span

    both = torch.cat([code(*parent), code(*child)])
    unique, inverse = torch.unique(both, return_inverse=True)
    span = unique % n_spans
    rest = unique // n_spans
    index = rest % n_index - 1
    rest = rest // n_index
    layer = rest % (g.n_layers + 2) - 1
    kind = rest // (g.n_layers + 2)
    nodes = Nodes(_node_names(kind, layer, index, span, spans), kind, layer, index, span)
    n = parent[0].numel()
    return nodes, inverse[:n], inverse[n:]


# ------------------------------------------------------------------------------------------------
# Scores and concrete counts
# ------------------------------------------------------------------------------------------------


def _check_scores(scores, circuit: SpanCircuit) -> None:
    if scores.graph != circuit.graph:
        raise CircuitError(f"scores are for graph {scores.graph.spec()}, the circuit for {circuit.graph.spec()}")
    if scores.positional and tuple(scores.spans) != circuit.spans:
        raise CircuitError(f"scores are over spans {list(scores.spans)}, the circuit over {list(circuit.spans)}")
    if scores.positional and scores.query_edges != circuit.query_edges:
        raise CircuitError(f"scores have {scores.query_edges} query edges, the circuit {circuit.query_edges}")
    if not scores.positional and not circuit.single_span:
        raise CircuitError(f"{scores.method} scores are non-positional; the circuit is over spans {list(circuit.spans)}")


def _lookup_scores(cols: dict[str, torch.Tensor], scores) -> torch.Tensor:
    kind, span, edge = cols["kind"], cols["span"], cols["edge"]
    out = torch.full(kind.shape, float("nan"), dtype=torch.float64, device=HOST)
    w = kind == 0
    values = scores.values.detach().to(HOST, torch.float64)
    out[w] = values[span[w], edge[w]] if scores.positional else values[edge[w]]
    if scores.positional:
        for code, name in ((1, "k"), (2, "v"), (3, "q")):
            m = kind == code
            x = scores.crossing[name].detach().to(HOST, torch.float64)
            idx = (cols["layer"][m], cols["head"][m], cols["key_span"][m], span[m])
            out[m] = x[idx] if x.dim() == 4 else x[idx[0], idx[1], idx[3]]
    return out


def _normalise_counts(counts: dict | None) -> dict | None:
    """Concrete counts in EdgeScores.concrete's layout (within, crossing, last); span_counts' layout
    (tokens, pairs, last) is accepted too."""
    if not counts:
        return None
    if "within" in counts:
        return counts
    return {"within": counts["tokens"], "crossing": counts["pairs"], "last": counts["last"]}


def _lookup_concrete(cols: dict[str, torch.Tensor], counts: dict | None, g: Graph) -> torch.Tensor:
    kind, span, key_span = cols["kind"], cols["span"], cols["key_span"]
    if counts is None:
        return torch.full(kind.shape, float("nan"), dtype=torch.float64, device=HOST)
    within = counts["within"].to(HOST, torch.float64)
    last = counts["last"].to(HOST, torch.float64)
    pairs = counts["crossing"].to(HOST, torch.float64)
    to_logits = torch.zeros_like(kind, dtype=torch.bool)
    w = kind == 0
    to_logits[w] = g.edge_down[cols["edge"][w]] == g.logits_index
    out = within[span]
    out = torch.where(to_logits, last[span], out)
    paired = key_span >= 0
    out[paired] = pairs[key_span[paired], span[paired]]
    return out


# ------------------------------------------------------------------------------------------------
# Entry points
# ------------------------------------------------------------------------------------------------


def circuit_edges(circuits: Sequence[SpanCircuit | Circuit], scores=None, counts: dict | None = None) -> SpanEdges:
    """The union of `circuits`' span edges (bit i of `member`: in circuit i), largest |score| first.
    Scores come from `scores` (positional or not); concrete counts from `counts` (EdgeScores.concrete's
    or span_counts' layout) or else from `scores.concrete`, or are NaN."""
    if not circuits:
        raise CircuitError("no circuits given")
    if len(circuits) > 63:
        raise CircuitError(f"at most 63 circuits fit one member column, got {len(circuits)}")
    circuits = [c if isinstance(c, SpanCircuit) else SpanCircuit.from_circuit(c) for c in circuits]
    _check_same_graph(circuits)
    first = circuits[0]
    if scores is not None:
        _check_scores(scores, first)
    flats = [_flat(c) for c in circuits]
    union = torch.stack(flats).any(0)
    position = union.nonzero().flatten()
    member = torch.zeros_like(position)
    for i, f in enumerate(flats):
        member |= f[position].long() << i
    cols = _decode(position, first.graph, first.n_spans, first.query_edges)
    score = (_lookup_scores(cols, scores) if scores is not None
             else torch.full(position.shape, float("nan"), dtype=torch.float64, device=HOST))
    if counts is None and scores is not None and scores.positional:
        counts = scores.concrete
    concrete = _lookup_concrete(cols, _normalise_counts(counts), first.graph)
    parent, child = _ends(cols, first.graph)
    nodes, p, c = _index_nodes(parent, child, first.graph, first.spans)
    out = SpanEdges(first.graph, first.spans, first.query_edges, score=score, concrete=concrete, member=member,
                    parent=p, child=c, nodes=nodes, **cols)
    return out.sorted_by_score()


def score_edges(scores) -> SpanEdges:
    """Every edge of `scores`' span graph (a non-positional graph is one span, `*`), with its score:
    the full circuit's edges. Within edges into the logits exist only at spans where some example's
    last token lies (PEAP's `concrete["last"] > 0`)."""
    if scores.positional:
        last = scores.concrete.get("last")
        logit_spans = (last > 0) if last is not None else None
        full = SpanCircuit.full(scores.graph, scores.spans, logit_spans, scores.query_edges or "per_key")
    else:
        full = SpanCircuit.from_circuit(Circuit.full(scores.graph))
    return circuit_edges([full], scores)


__all__ = ["KINDS", "NODE_KINDS", "Nodes", "SpanEdges", "circuit_edges", "score_edges"]
