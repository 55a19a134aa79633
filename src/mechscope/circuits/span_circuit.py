"""Span circuits: position-aware circuits over a schema's spans (docs/method.md §2, §4-§6).

The span graph repeats the computational graph per span of the schema:

* within-position edges (u, S) -> (v, S): upstream node u's output at the tokens of span S read by
  downstream node v at the same tokens (the logits read only at each example's last token);
* crossing edges inside attention head h: its key or value input at span S' -> h's output at span S
  for S' <= S (the tokens t' <= t of those spans), and its query input at S -> h's output at S in
  its scores against the keys of span S' (per-key query edges, the default, indexed like k and v by
  (S', S)), or against every key at once (whole-row query edges, indexed by S alone).

A `SpanCircuit` is a set of these edges. Projected onto an example, a within edge stands for |S|
token edges (one for the logits), a crossing key/value/per-key query edge for the pairs (t', t) with
t' in S', t in S and t' <= t, and a whole-row query edge for |S|; circuit size is reported in these
concrete token edges, averaged over the evaluation examples. Files of format /2 hold per-key query
edges ("S':aL.hH.q -> S:aL.hH": the query at S in its scores against keys at S'); format /1, the
earlier format, holds whole-row ones ("S:aL.hH.q -> S:aL.hH"), and whole-row circuits are saved in it.

A non-positional `Circuit` is the special case of one span covering every token (named `*`) with every
crossing edge kept (non-positional evaluation never ablates inside attention): `from_circuit`.

Selection (`span_greedy`, `span_top_n`, `span_threshold`) follows §5. `attention="scored"` makes crossing edges compete
for the budget like any other edge (PEAP); `attention="whole"` keeps all crossing edges of every head in
the circuit for free, which with one span is exactly the non-positional greedy.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..devices import HOST
from .exportable import Exportable
from .circuit import Circuit, CircuitError, check_graph, check_threshold, read_circuit_file
from ..fileio import write_json
from ..graph import Graph

ALL_TOKENS = "*"
SPAN_FORMAT = "mechscope-span-circuit/2"
WHOLE_ROW_FORMAT = "mechscope-span-circuit/1"  # whole-row query edges (and every file before per-key ones)
SPAN_FORMATS = (SPAN_FORMAT, WHOLE_ROW_FORMAT)
ATTENTION_MODES = ("scored", "whole")


@dataclass
class SpanCircuit(Exportable):
    graph: Graph
    spans: tuple[str, ...]
    within: torch.Tensor  # bool [n_spans, n_edges]
    # "k", "v", "q": bool [layer, head, key span, query span]; whole-row "q": [layer, head, query span]
    crossing: dict[str, torch.Tensor]
    logit_spans: torch.Tensor  # bool [n_spans]: spans holding some example's last token
    model: str = ""
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    task: str = ""  # the dataset's task the circuit was found for
    # each edge's score (NaN: none), float64 shaped like the edges ("within", "k", "v", "q"), or None
    scores: dict[str, torch.Tensor] | None = None

    def set_scores(self, scores) -> "SpanCircuit":
        """Keep each edge's score from `scores` (EdgeScores over this circuit's spans, or non-positional
        ones for a one-span circuit), to be saved with the circuit. Returns the circuit."""
        from .circuit_scores import span_scores_for

        self.scores = span_scores_for(self, scores, CircuitError)
        return self

    @property
    def n_spans(self) -> int:
        return len(self.spans)

    @property
    def n_within(self) -> int:
        return int(self.within.sum())

    @property
    def n_crossing(self) -> int:
        return int(sum(int(v.sum()) for v in self.crossing.values()))

    @property
    def n_edges(self) -> int:
        """Span-level edges (within and crossing)."""
        return self.n_within + self.n_crossing

    @property
    def single_span(self) -> bool:
        return self.spans == (ALL_TOKENS,)

    @property
    def query_edges(self) -> str:
        """`per_key` or `whole_row`, by the shape of crossing["q"]."""
        return "whole_row" if self.crossing["q"].dim() == 3 else "per_key"

    # ---------------------------------------------------------------------------------------------

    @classmethod
    def from_circuit(cls, circuit: Circuit) -> "SpanCircuit":
        """The non-positional circuit as a span circuit: one span over every token, every crossing edge
        kept (dead ones are dropped by `prune`, as they carry reference values either way)."""
        g = circuit.graph
        c = _full_crossing(g, 1)
        out = cls(g, (ALL_TOKENS,), circuit.edges[None].clone(), c, torch.ones(1, dtype=torch.bool, device=HOST),
                  model=circuit.model, method=circuit.method, info=dict(circuit.info, positional=False))
        return prune_span_circuit(out)

    @classmethod
    def full(cls, graph: Graph, spans, logit_spans: torch.Tensor | None = None, query_edges: str = "per_key",
             **kw) -> "SpanCircuit":
        n = len(spans)
        logit_spans = torch.ones(n, dtype=torch.bool, device=HOST) if logit_spans is None else logit_spans.bool()
        within = torch.ones(n, graph.n_edges, dtype=torch.bool, device=HOST)
        within[:, graph.edge_down == graph.logits_index] &= logit_spans[:, None]
        return cls(graph, tuple(spans), within, _full_crossing(graph, n, query_edges), logit_spans, **kw)

    @classmethod
    def empty(cls, graph: Graph, spans, logit_spans: torch.Tensor | None = None, query_edges: str = "per_key",
              **kw) -> "SpanCircuit":
        n = len(spans)
        logit_spans = torch.ones(n, dtype=torch.bool, device=HOST) if logit_spans is None else logit_spans.bool()
        crossing = {k: torch.zeros_like(v) for k, v in _full_crossing(graph, n, query_edges).items()}
        return cls(graph, tuple(spans), torch.zeros(n, graph.n_edges, dtype=torch.bool, device=HOST), crossing, logit_spans, **kw)

    # ---------------------------------------------------------------------------------------------

    def span_map(self, dataset) -> list[int]:
        """For each span of `dataset`'s schema, the circuit span its tokens belong to."""
        if self.single_span:
            return [0] * len(dataset.schema)
        if tuple(dataset.schema.spans) != self.spans:
            raise CircuitError(
                f"span circuit over spans {list(self.spans)} does not fit a dataset with schema "
                f"{list(dataset.schema.spans)}"
            )
        return list(range(self.n_spans))

    def concrete_edges(self, dataset) -> dict[str, float]:
        """Token-level edges this circuit stands for on `dataset`, averaged over its examples:
        {"within", "crossing", "total"}."""
        counts = span_counts(dataset, self.span_map(dataset), self.n_spans)
        g = self.graph
        logit_edge = (g.edge_down == g.logits_index)
        per_span = counts["tokens"][:, None].expand(-1, g.n_edges).clone()  # [S, E]
        per_span[:, logit_edge] = counts["last"][:, None]
        within = float((self.within.double() * per_span).sum())
        pairs = counts["pairs"]  # [key span, query span]
        q_count = pairs if self.query_edges == "per_key" else counts["tokens"]
        crossing = float((self.crossing["k"].double() * pairs).sum() + (self.crossing["v"].double() * pairs).sum()
                         + (self.crossing["q"].double() * q_count).sum())
        return {"within": within, "crossing": crossing, "total": within + crossing}

    def projection(self, span_of: torch.Tensor):
        """Keep masks for a batch whose tokens lie in circuit spans `span_of` [b, t] (-1: padding):
        (within [S, n_up, n_down] float, crossing keep dicts per layer that ablates any crossing edge:
        [batch, head, t (query), t' (key)] for k, v and q; a whole-row query edge keeps or ablates all
        of its row)."""
        g = self.graph
        within = g.dense(self.within.float()).to(span_of.device)  # on the batch's device, like the masks
        sp = span_of.clamp(min=0)
        keep = {"k": {}, "v": {}, "q": {}}
        valid = _valid_pairs(self.n_spans)
        crossing = dict(self.crossing)
        if self.query_edges == "whole_row":  # the same query for every key span
            crossing["q"] = crossing["q"][:, :, None, :].expand(-1, -1, self.n_spans, -1)
        for l in range(g.n_layers):
            if all(bool((crossing[kind][l] | ~valid).all()) for kind in keep):
                continue
            for kind in keep:  # [head, key span, query span] -> [batch, head, t (query), t' (key)]
                x = crossing[kind][l].to(sp.device)
                keep[kind][l] = x.transpose(1, 2)[:, sp[:, :, None], sp[:, None, :]].permute(1, 0, 2, 3).float()
        return within, (keep["k"], keep["v"], keep["q"])

    def nodes(self) -> list[tuple[str, str]]:
        """(upstream node, span) pairs with a circuit edge leaving them."""
        g = self.graph
        out = set()
        for s, e in self.within.nonzero().tolist():
            out.add((g.upstream_names[int(g.edge_up[e])], self.spans[s]))
        return sorted(out)

    # ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        g = self.graph
        within = {
            self.spans[s]: [g.edge_name(e) for e in self.within[s].nonzero().flatten().tolist()]
            for s in range(self.n_spans)
        }
        crossing = []
        per_key = self.query_edges == "per_key"
        for kind in ("k", "v", "q") if per_key else ("k", "v"):
            for l, h, a, b in self.crossing[kind].nonzero().tolist():
                crossing.append(f"{self.spans[a]}:a{l}.h{h}.{kind} -> {self.spans[b]}:a{l}.h{h}")
        if not per_key:
            for l, h, s in self.crossing["q"].nonzero().tolist():
                crossing.append(f"{self.spans[s]}:a{l}.h{h}.q -> {self.spans[s]}:a{l}.h{h}")
        out = {
            "format": SPAN_FORMAT if per_key else WHOLE_ROW_FORMAT,
            "model": self.model,
            "method": self.method,
            "task": self.task,
            "graph": g.spec(),
            "spans": list(self.spans),
            "logit_spans": [self.spans[i] for i in self.logit_spans.nonzero().flatten().tolist()],
            "n_edges": self.n_edges,
            "within": within,
            "crossing": crossing,
            "info": self.info,
        }
        if self.scores is not None:
            from .circuit_scores import span_scores_json

            out["scores"] = span_scores_json(self)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SpanCircuit":
        path = Path(path)
        data, graph = read_circuit_file(path, "span circuit file", None)
        if data.get("format") not in SPAN_FORMATS:
            if "format" not in data:
                raise CircuitError(f"{path}: missing field 'format' (\"{SPAN_FORMAT}\")")
            raise CircuitError(f"{path}: field 'format' is {data['format']!r}, not one of {', '.join(SPAN_FORMATS)}")
        query_edges = "per_key" if data["format"] == SPAN_FORMAT else "whole_row"
        field_name = "spans"
        try:
            spans = tuple(data["spans"])
            if not all(isinstance(x, str) for x in spans) or len(set(spans)) != len(spans):
                raise ValueError("span names must be unique strings")
            span_index = {s: i for i, s in enumerate(spans)}
            edge_index = {graph.edge_name(e): e for e in range(graph.n_edges)}
            n = len(spans)
            field_name = "within"
            within = torch.zeros(n, graph.n_edges, dtype=torch.bool, device=HOST)
            within_at: dict[int, list[int]] = {}  # the edge of each entry, for the scores
            crossing_at: list[tuple] = []
            for span, names in data["within"].items():
                for name in names:
                    if name not in edge_index:
                        raise CircuitError(f"{path}: field 'within': edge '{name}' is not in a graph of this shape")
                    within[span_index[span], edge_index[name]] = True
                    within_at.setdefault(span_index[span], []).append(edge_index[name])
            field_name = "crossing"
            crossing = {k: torch.zeros_like(v) for k, v in _full_crossing(graph, n, query_edges).items()}
            for item in data["crossing"]:
                src, dst = (part.strip() for part in item.split("->"))
                src_span, src_node = src.split(":")
                dst_span, _ = dst.split(":")
                layer, head, kind = src_node.split(".")
                l, h = int(layer[1:]), int(head[1:])
                if kind == "q" and query_edges == "whole_row":
                    at = (l, h, span_index[src_span])
                else:
                    at = (l, h, span_index[src_span], span_index[dst_span])
                crossing[kind][at] = True
                crossing_at.append((kind, at))
            field_name = "logit_spans"
            logit_spans = torch.zeros(n, dtype=torch.bool, device=HOST)
            for s in data["logit_spans"]:
                logit_spans[span_index[s]] = True
        except CircuitError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise CircuitError(f"{path}: not a mechscope span circuit file (field '{field_name}': "
                               f"{type(exc).__name__}: {exc})") from None
        scores = None
        if data.get("scores") is not None:
            from .circuit_scores import read_span_scores

            shapes = {"within": tuple(within.shape), **{k: tuple(v.shape) for k, v in crossing.items()}}
            scores = read_span_scores(path, data["scores"], within_at, span_index, crossing_at, shapes, CircuitError)
        return cls(graph, spans, within, crossing, logit_spans, model=data.get("model", ""),
                   method=data.get("method", ""), info=data.get("info", {}), task=data.get("task", ""), scores=scores)

    def check_model(self, model, source: str = "span circuit") -> None:
        """Raise CircuitError unless the circuit was built for a graph of `model`'s shape."""
        check_graph(self.graph, model, self.model, source)


def load_any_circuit(path: str | os.PathLike):
    """A `Circuit` or `SpanCircuit` from its JSON file, whichever it holds (by its `format`)."""
    data, _ = read_circuit_file(Path(path), "circuit file", None)
    return SpanCircuit.load(path) if data.get("format") in SPAN_FORMATS else Circuit.load(path)


def _full_crossing(graph: Graph, n_spans: int, query_edges: str = "per_key") -> dict[str, torch.Tensor]:
    valid = _valid_pairs(n_spans)
    kv = valid.expand(graph.n_layers, graph.n_heads, n_spans, n_spans).clone()
    q = (kv.clone() if query_edges == "per_key"
         else torch.ones(graph.n_layers, graph.n_heads, n_spans, dtype=torch.bool, device=HOST))
    return {"k": kv, "v": kv.clone(), "q": q}


def _valid_pairs(n_spans: int) -> torch.Tensor:
    """[key span, query span]: True where key span <= query span (keys precede their queries)."""
    return torch.ones(n_spans, n_spans, dtype=torch.bool, device=HOST).triu()


def span_counts(dataset, span_map: list[int], n_spans: int) -> dict[str, torch.Tensor]:
    """Per circuit span, averaged over examples: tokens [S], last tokens [S] (the logits' position)
    and causal (t', t) pairs [key span, query span]."""
    tokens = torch.zeros(n_spans, dtype=torch.float64, device=HOST)
    last = torch.zeros(n_spans, dtype=torch.float64, device=HOST)
    pairs = torch.zeros(n_spans, n_spans, dtype=torch.float64, device=HOST)
    mapping = torch.tensor(span_map, dtype=torch.long, device=HOST)
    for ex in dataset.examples:
        spans = mapping[torch.tensor(ex.span_of_positions(), device=HOST)]
        onehot = torch.nn.functional.one_hot(spans, n_spans).double()  # [t, s]
        tokens += onehot.sum(0)
        last += onehot[-1]
        causal = torch.ones(len(spans), len(spans), dtype=torch.float64, device=HOST).tril()  # [t, t']
        pairs += torch.einsum("jk,tj,tq->kq", onehot, causal, onehot)
    n = max(1, len(dataset))
    return {"tokens": tokens / n, "last": last / n, "pairs": pairs / n}


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


class SpanGraphScores:
    """|score| of every span-graph edge, from positional `EdgeScores` (PEAP)."""

    def __init__(self, scores):
        if not scores.positional:
            raise ValueError("span circuits are selected from positional (peap) scores")
        g = scores.graph
        self.graph, self.spans = g, tuple(scores.spans)
        # recorded by the circuits selected from it
        self.model, self.method, self.metric = scores.model, scores.method, scores.metric
        n = len(self.spans)
        last = scores.concrete.get("last")
        self.logit_spans = (last > 0) if last is not None else torch.ones(n, dtype=torch.bool, device=HOST)
        within = scores.values.abs().double().nan_to_num(nan=-1.0)  # [S, E]
        logit_edge = g.edge_down == g.logits_index
        within[:, logit_edge] = torch.where(self.logit_spans[:, None], within[:, logit_edge], float("-inf"))
        self.within = within
        valid = _valid_pairs(n)
        self.query_edges = scores.query_edges
        self.crossing = {kind: scores.crossing[kind].abs().double() for kind in ("k", "v", "q")}
        for kind in ("k", "v", "q") if self.query_edges == "per_key" else ("k", "v"):
            self.crossing[kind] = self.crossing[kind].masked_fill(~valid, float("-inf"))

    @property
    def n_edges(self) -> int:
        """Edges of the span graph (within and crossing)."""
        return int(torch.isfinite(self.within).sum()) + int(
            sum(int(torch.isfinite(v).sum()) for v in self.crossing.values())
        )


def span_greedy_order(scores, budget: int, attention: str = "scored") -> list[tuple]:
    """The order in which greedy construction (§5) adds span-graph edges, up to `budget` of them.

    Items: ("w", span, edge) or ("k" | "v" | "q", layer, head, key span, query span) or, for whole-row
    query edges, ("q", layer, head, span). Greedy with budget n chooses the first n items, so one order serves a whole curve.
    Each open child node offers its incoming edges best-first, so the heap holds one entry per open
    node (a k-way merge) rather than every candidate edge.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"unknown attention mode '{attention}'; choose one of {', '.join(ATTENTION_MODES)}")
    sg = scores if isinstance(scores, SpanGraphScores) else SpanGraphScores(scores)
    g = sg.graph
    n_spans, n_up = len(sg.spans), g.n_upstream
    dense = g.dense(sg.within, fill=float("-inf"))  # [S, n_up, n_down]
    ranked = dense.transpose(1, 2).argsort(dim=-1, descending=True, stable=True)  # [S, n_down, n_up]
    ranked_scores = dense.transpose(1, 2).gather(-1, ranked)
    edge_id = torch.full((n_up, g.n_downstream), -1, dtype=torch.long, device=HOST)
    edge_id[g.edge_up, g.edge_down] = torch.arange(g.n_edges, device=HOST)
    ranked_l, ranked_s = ranked.tolist(), ranked_scores.tolist()
    edge_id_l = edge_id.tolist()
    q_scores, k_scores, v_scores = (sg.crossing[k].tolist() for k in ("q", "k", "v"))
    per_key = sg.query_edges == "per_key"
    head_layer = {g.head_index(l, h): (l, h) for l in range(g.n_layers) for h in range(g.n_heads)}
    mlp_in = {g.mlp_index(l): g.mlp_in_index(l) for l in range(g.n_layers)}
    n_edges = g.n_edges

    heap: list[tuple[float, int, int, tuple]] = []  # (-score, tie, pointer, node)
    offers: dict[tuple, list] = {}
    open_down: set[tuple[int, int]] = set()
    open_heads: set[tuple[int, int]] = set()
    order: list[tuple] = []

    def push(node, pointer: int) -> None:
        items = offers[node]
        while pointer < len(items):
            score, tie, item = items[pointer]
            if score == float("-inf"):
                return
            heapq.heappush(heap, (-score, tie, pointer, node))
            return

    def open_downstream(v: int, s: int) -> None:
        if (v, s) in open_down:
            return
        open_down.add((v, s))
        us, ss = ranked_l[s][v], ranked_s[s][v]
        items = []
        for u, sc in zip(us, ss):
            if sc == float("-inf"):
                break
            e = edge_id_l[u][v]
            items.append((sc, e, ("w", s, e)))
        offers[("d", v, s)] = items
        push(("d", v, s), 0)

    def open_upstream(u: int, s: int) -> None:
        if u in mlp_in:
            open_downstream(mlp_in[u], s)
        elif u in head_layer:
            l, h = head_layer[u]
            if (u, s) in open_heads:
                return
            open_heads.add((u, s))
            tie = n_edges + 3 * (u * n_spans + s)
            items = [] if per_key else [(q_scores[l][h][s], tie, ("q", l, h, s))]
            for a in range(s + 1):
                if per_key:
                    items.append((q_scores[l][h][a][s], tie, ("q", l, h, a, s)))
                items.append((k_scores[l][h][a][s], tie + 1, ("k", l, h, a, s)))
                items.append((v_scores[l][h][a][s], tie + 2, ("v", l, h, a, s)))
            items.sort(key=lambda it: (-it[0], it[1], it[2]))
            if attention == "whole":
                for _, _, item in items:
                    open_crossing_parent(item)
                return
            offers[("h", u, s)] = items
            push(("h", u, s), 0)

    def open_crossing_parent(item) -> None:
        kind, l, h = item[0], item[1], item[2]
        group = h // g.group_size
        if kind == "q":  # the query input at the query span (the item's last index)
            open_downstream(g.q_slice(l).start + h, item[-1])
        else:
            sl = g.k_slice(l) if kind == "k" else g.v_slice(l)
            open_downstream(sl.start + group, item[3])

    for s in range(n_spans):
        if bool(sg.logit_spans[s]):
            open_downstream(g.logits_index, s)
    while heap and len(order) < budget:
        _, _, pointer, node = heapq.heappop(heap)
        _, _, item = offers[node][pointer]
        push(node, pointer + 1)
        order.append(item)
        if item[0] == "w":
            u = int(g.edge_up[item[2]])
            if u != 0:
                open_upstream(u, item[1])
        else:
            open_crossing_parent(item)
    return order


def span_top_order(scores, budget: int, attention: str = "scored") -> list[tuple]:
    """Span-graph edges by decreasing |score| (top-n selection), up to `budget` of them."""
    if attention != "scored":
        raise ValueError("top-n span selection scores crossing edges; use attention='scored'")
    sg = scores if isinstance(scores, SpanGraphScores) else SpanGraphScores(scores)
    flat = [sg.within.flatten(), sg.crossing["k"].flatten(), sg.crossing["v"].flatten(), sg.crossing["q"].flatten()]
    allv = torch.cat(flat)
    top = allv.argsort(descending=True, stable=True)[: min(budget, sg.n_edges)]
    shapes = [sg.within.shape, sg.crossing["k"].shape, sg.crossing["v"].shape, sg.crossing["q"].shape]
    ends = torch.tensor([t.numel() for t in flat], device=HOST).cumsum(0)
    part_of = torch.bucketize(top, ends, right=True)  # which of the four tensors each index is in
    out: list = [None] * len(top)
    for part, (kind, shape) in enumerate(zip(("w", "k", "v", "q"), shapes)):
        rows = (part_of == part).nonzero().flatten()
        local = top[rows] - (ends[part - 1] if part else 0)
        coords = torch.stack(torch.unravel_index(local, shape), 1).tolist()
        for row, idx in zip(rows.tolist(), coords):
            out[row] = (kind, *idx)
    return out


def circuit_from_order(scores, order: list[tuple], attention: str = "scored", prune: bool = True,
                       info: dict | None = None) -> SpanCircuit:
    """The span circuit holding the edges of `order` (with every crossing edge of its heads when
    `attention="whole"`), pruned to the edges on a path from the input to the logits."""
    sg = scores if isinstance(scores, SpanGraphScores) else SpanGraphScores(scores)
    g, n = sg.graph, len(sg.spans)
    within = torch.zeros(n, g.n_edges, dtype=torch.bool, device=HOST)
    crossing = {k: torch.zeros_like(v) for k, v in _full_crossing(g, n, sg.query_edges).items()}
    for item in order:
        if item[0] == "w":
            within[item[1], item[2]] = True
        else:
            crossing[item[0]][item[1:]] = True
    if attention == "whole":
        crossing = _full_crossing(g, n, sg.query_edges)
    c = SpanCircuit(g, sg.spans, within, crossing, sg.logit_spans.clone(),
                    model=getattr(scores, "model", ""), method=getattr(scores, "method", ""),
                    info=dict(info or {}, attention=attention, metric=getattr(scores, "metric", "")))
    return prune_span_circuit(c) if prune else c


def span_greedy(scores, n: int, attention: str = "scored") -> SpanCircuit:
    return circuit_from_order(scores, span_greedy_order(scores, n, attention), attention,
                              info={"selection": "greedy", "n": int(n)})


def span_top_n(scores, n: int) -> SpanCircuit:
    return circuit_from_order(scores, span_top_order(scores, n), "scored", info={"selection": "top_n", "n": int(n)})


def span_threshold(scores, value: float, prune: bool = True) -> SpanCircuit:
    """Every span-graph edge (within and crossing) with |score| >= `value` (a finite number >= 0),
    pruned to the edges on a path from the input to the logits unless `prune` is False."""
    value = check_threshold(value)
    sg = scores if isinstance(scores, SpanGraphScores) else SpanGraphScores(scores)
    kept = int((sg.within >= value).sum()) + sum(int((v >= value).sum()) for v in sg.crossing.values())
    # top-n order is by decreasing |score|, so its first `kept` items are exactly those >= value
    return circuit_from_order(sg, span_top_order(sg, kept), "scored", prune=prune,
                              info={"selection": "threshold", "threshold": value})


def prune_span_circuit(circuit: SpanCircuit) -> SpanCircuit:
    """Drop edges that are not on a path from the input to the logits in the span graph."""
    g, n = circuit.graph, circuit.n_spans
    W = g.dense(circuit.within)  # [S, n_up, n_down] bool
    ck, cv, cq = circuit.crossing["k"], circuit.crossing["v"], circuit.crossing["q"]
    per_key = circuit.query_edges == "per_key"
    if per_key:  # the query input at span S feeds the head at S through any of its key spans
        cq = cq.any(2)  # [L, H, query span]
    gs = g.group_size
    alive_up = torch.zeros(g.n_upstream, n, dtype=torch.bool, device=HOST)
    alive_down = torch.zeros(g.n_downstream, n, dtype=torch.bool, device=HOST)
    alive_up[0] = True

    def reads(lo: int, hi: int, step: int) -> None:
        nb = g.n_upstream_before(step)
        alive_down[lo:hi] = (W[:, :nb, lo:hi] & alive_up[:nb].T[:, :, None]).any(1).T

    def group_expand(x: torch.Tensor) -> torch.Tensor:  # [kv, S] -> [heads, S]
        return x.repeat_interleave(gs, dim=0)

    for l in range(g.n_layers):
        qs, ks, vs = g.q_slice(l), g.k_slice(l), g.v_slice(l)
        reads(qs.start, vs.stop, 2 * l)
        if g.parallel_attn_mlp:
            reads(g.mlp_in_index(l), g.mlp_in_index(l) + 1, 2 * l)
        heads = g.upstream_slice(l)
        ak, av = group_expand(alive_down[ks]), group_expand(alive_down[vs])  # [H, S'] (key span)
        head_alive = (cq[l] & alive_down[qs]) | (ck[l] & ak[:, :, None]).any(1) | (cv[l] & av[:, :, None]).any(1)
        alive_up[heads] = head_alive
        if not g.parallel_attn_mlp:
            reads(g.mlp_in_index(l), g.mlp_in_index(l) + 1, 2 * l + 1)
        alive_up[g.mlp_index(l)] = alive_down[g.mlp_in_index(l)]
    reads(g.logits_index, g.logits_index + 1, 2 * g.n_layers)

    reach_up = torch.zeros(g.n_upstream, n, dtype=torch.bool, device=HOST)
    reach_down = torch.zeros(g.n_downstream, n, dtype=torch.bool, device=HOST)
    reach_down[g.logits_index] = circuit.logit_spans

    def writes(lo: int, hi: int) -> None:
        reach_up[lo:hi] = (W[:, lo:hi, :] & reach_down.T[:, None, :]).any(2).T

    for l in range(g.n_layers - 1, -1, -1):
        m = g.mlp_index(l)
        writes(m, m + 1)
        reach_down[g.mlp_in_index(l)] = reach_up[m]
        heads = g.upstream_slice(l)
        writes(heads.start, heads.stop)
        rh = reach_up[heads]  # [H, S] (query span)
        qs, ks, vs = g.q_slice(l), g.k_slice(l), g.v_slice(l)
        reach_down[qs] = cq[l] & rh
        rk = (ck[l] & rh[:, None, :]).any(2).view(g.n_kv_heads, gs, n).any(1)  # [kv, S']
        rv = (cv[l] & rh[:, None, :]).any(2).view(g.n_kv_heads, gs, n).any(1)
        reach_down[ks], reach_down[vs] = rk, rv
    writes(0, 1)

    within = circuit.within & (alive_up[g.edge_up].T & reach_down[g.edge_down].T)
    crossing = {}
    for kind, sl in (("k", "k_slice"), ("v", "v_slice")):
        parent = torch.stack([group_expand(alive_down[getattr(g, sl)(l)]) for l in range(g.n_layers)])  # [L, H, S']
        child = torch.stack([reach_up[g.upstream_slice(l)] for l in range(g.n_layers)])  # [L, H, S]
        crossing[kind] = circuit.crossing[kind] & parent[:, :, :, None] & child[:, :, None, :]
    q_parent = torch.stack([alive_down[g.q_slice(l)] for l in range(g.n_layers)])
    q_child = torch.stack([reach_up[g.upstream_slice(l)] for l in range(g.n_layers)])
    q_alive = q_parent & q_child  # [L, H, query span]
    crossing["q"] = circuit.crossing["q"] & (q_alive[:, :, None, :] if per_key else q_alive)
    return SpanCircuit(g, circuit.spans, within, crossing, circuit.logit_spans, model=circuit.model,
                       method=circuit.method, info=dict(circuit.info, pruned=True))
