"""Circuits: sets of edges chosen from scores (docs/method.md §5), saved as JSON.

* `top_n` / `threshold`: the edges of largest |score|, or |score| above a value;
* `greedy` (as in PEAP): grow from the logits, each time adding the highest-|score| edge whose child
  is already in the circuit (its parent joins the circuit);
* `prune`: keep only edges on a path from the input to the logits.

A node is "in" the circuit through the inputs it owns: a head through its query input and its
group's key/value inputs, an MLP through its input.
"""

from __future__ import annotations

import heapq
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.dataset import parse_json_object, read_text_file
from ..devices import HOST
from ..errors import MechscopeError, ParameterError
from ..fileio import write_json
from ..graph import Graph, GraphError
from .exportable import Exportable


class CircuitError(MechscopeError, ValueError):
    """A circuit file that cannot be read or does not fit the model."""


@dataclass
class Circuit(Exportable):
    graph: Graph
    edges: torch.Tensor  # bool [n_edges]
    model: str = ""
    method: str = ""
    info: dict[str, Any] = field(default_factory=dict)
    task: str = ""  # the dataset's task the circuit was found for
    scores: torch.Tensor | None = None  # float64 [n_edges]: each edge's score (NaN: none), or None

    @property
    def n_edges(self) -> int:
        return int(self.edges.sum())

    def set_scores(self, scores) -> "Circuit":
        """Keep each edge's score from `scores` (EdgeScores of this graph; positional ones are summed
        over spans), to be saved with the circuit. Returns the circuit."""
        from .circuit_scores import edge_scores_for

        self.scores = edge_scores_for(self.graph, scores, CircuitError)
        return self

    def keep_matrix(self, dtype=torch.float32) -> torch.Tensor:
        """Dense [n_up, n_down]: 1 for circuit edges, 0 for ablated ones."""
        return self.graph.dense(self.edges.to(dtype))

    def nodes(self) -> list[str]:
        """Upstream nodes with at least one circuit edge, by name."""
        used = torch.zeros(self.graph.n_upstream, dtype=torch.bool, device=HOST)
        used[self.graph.edge_up[self.edges]] = True
        return [self.graph.upstream_names[i] for i in used.nonzero().flatten().tolist()]

    def edge_names(self) -> list[str]:
        return [self.graph.edge_name(e) for e in self.edges.nonzero().flatten().tolist()]

    @classmethod
    def full(cls, graph: Graph, **kw) -> "Circuit":
        return cls(graph, torch.ones(graph.n_edges, dtype=torch.bool, device=HOST), **kw)

    @classmethod
    def empty(cls, graph: Graph, **kw) -> "Circuit":
        return cls(graph, torch.zeros(graph.n_edges, dtype=torch.bool, device=HOST), **kw)

    # ---------------------------------------------------------------------------------------------

    def to_json(self) -> dict:
        g = self.graph
        names = self.edge_names()
        out = {
            "format": "mechscope-circuit/1",
            "model": self.model,
            "method": self.method,
            "task": self.task,
            "graph": g.spec(),
            "n_edges": self.n_edges,
            "edges": names,
            "info": self.info,
        }
        if self.scores is not None:
            from .circuit_scores import circuit_scores_json

            out["scores"] = circuit_scores_json(names, self.edges, self.scores)
        return out

    def save(self, path: str | os.PathLike) -> Path:
        return write_json(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Circuit":
        path = Path(path)
        data, graph = read_circuit_file(path, "circuit file", "mechscope-circuit/1")
        names = data.get("edges")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise CircuitError(f"{path}: field 'edges' must be a list of edge names")
        index = {graph.edge_name(e): e for e in range(graph.n_edges)}
        edges = torch.zeros(graph.n_edges, dtype=torch.bool, device=HOST)
        for name in names:
            if name not in index:
                raise CircuitError(f"{path}: field 'edges': edge '{name}' is not in a graph of this shape")
            edges[index[name]] = True
        scores = None
        if data.get("scores") is not None:
            from .circuit_scores import read_circuit_scores

            scores = read_circuit_scores(path, data["scores"], index, graph.n_edges, CircuitError)
        return cls(graph, edges, model=data.get("model", ""), method=data.get("method", ""), info=data.get("info", {}),
                   task=data.get("task", ""), scores=scores)

    def check_model(self, model, source: str = "circuit") -> None:
        """Raise CircuitError unless the circuit was built for a graph of `model`'s shape."""
        check_graph(self.graph, model, self.model, source)


def check_graph(graph: Graph, model, built_for: str = "", source: str = "circuit") -> None:
    """Raise CircuitError unless `graph` (of a circuit built for model `built_for`) has `model`'s
    shape; the message names what differs."""
    other = Graph.from_model(model)
    if not graph.same_shape(other):
        raise CircuitError(
            f"{source} was built for a model of another shape ('{built_for or '?'}'): "
            f"{', '.join(graph.differences(other))} (the {source}'s vs this model's)"
        )


def read_circuit_file(path: Path, what: str, fmt: str | None) -> tuple[dict, Graph]:
    """(the JSON object, its graph) of a circuit file of format `fmt` (None: any), or CircuitError
    naming the file and field: missing, a directory, not UTF-8, not JSON, another format, a malformed
    graph."""
    data = parse_json_object(read_text_file(path, what, CircuitError), str(path), CircuitError)
    if fmt is not None and data.get("format", fmt) != fmt:
        raise CircuitError(f"{path}: field 'format' is {data['format']!r}, not {fmt!r}")
    if "graph" not in data:
        raise CircuitError(f"{path}: missing field 'graph'")
    for key, kind in (("model", str), ("method", str), ("task", str), ("info", dict)):
        if key in data and not isinstance(data[key], kind):
            raise CircuitError(f"{path}: field '{key}' must be {'a string' if kind is str else 'a JSON object'}")
    try:
        graph = Graph.from_spec(data["graph"])
    except GraphError as exc:
        raise CircuitError(f"{path}: not a mechscope {what} ({exc})") from None
    return data, graph


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------


def _abs_scores(scores) -> torch.Tensor:
    return scores.edge_scores().abs().nan_to_num(nan=-1.0)


def top_n(scores, n: int, prune: bool = True) -> Circuit:
    s = _abs_scores(scores)
    n = max(0, min(int(n), s.numel()))
    edges = torch.zeros(s.numel(), dtype=torch.bool, device=HOST)
    edges[s.argsort(descending=True, stable=True)[:n]] = True
    c = Circuit(scores.graph, edges, model=scores.model, method=scores.method, info={"selection": "top_n", "n": n, "metric": scores.metric})
    return prune_circuit(c) if prune else c


def check_threshold(value) -> float:
    """`value` as a float, or ParameterError unless it is a finite number >= 0 (a |score| bound)."""
    try:
        bound = float(value)
    except (TypeError, ValueError):
        bound = None
    if bound is None or isinstance(value, bool) or not math.isfinite(bound) or bound < 0:
        raise ParameterError(f"threshold must be a finite number >= 0 (edges with |score| >= it are kept), "
                             f"got {value!r}")
    return bound


def threshold(scores, value: float, prune: bool = True) -> Circuit:
    value = check_threshold(value)
    edges = _abs_scores(scores) >= value
    c = Circuit(scores.graph, edges, model=scores.model, method=scores.method,
                info={"selection": "threshold", "threshold": value, "metric": scores.metric})
    return prune_circuit(c) if prune else c


def greedy(scores, n: int) -> Circuit:
    """Grow from the logits: repeatedly add the best edge whose child is in the circuit, then prune."""
    return circuit_from_greedy_order(scores, greedy_order(scores, n), n)


def circuit_from_greedy_order(scores, order: list[int], n: int | None = None) -> Circuit:
    """The pruned circuit of the edges of a `greedy_order` prefix (greedy with budget n takes the
    first n; `n` is recorded, default the prefix's length)."""
    g = scores.graph
    chosen = torch.zeros(g.n_edges, dtype=torch.bool, device=HOST)
    chosen[torch.tensor(order, dtype=torch.long, device=HOST)] = True
    c = Circuit(g, chosen, model=scores.model, method=scores.method,
                info={"selection": "greedy", "n": int(len(order) if n is None else n), "metric": scores.metric})
    return prune_circuit(c)


def greedy_order(scores, budget: int) -> list[int]:
    """The edges greedy construction adds, in order, up to `budget` of them: one order serves every
    budget up to it."""
    g = scores.graph
    s = _abs_scores(scores).tolist()
    owners = g.downstream_owner()
    # Edges grouped by the upstream node that owns their child (the logits own themselves: key -1).
    by_owner: dict[int, list[int]] = {}
    edge_down = g.edge_down.tolist()
    for e, v in enumerate(edge_down):
        for o in owners[v] or [-1]:
            by_owner.setdefault(o, []).append(e)
    chosen = [False] * g.n_edges
    in_circuit: set[int] = set()
    # A k-way merge: each opened owner offers its edges best first, so the heap holds one entry per
    # opened owner; (-|score|, edge) orders them as one heap of all offered edges would.
    heap: list[tuple[float, int, int, int]] = []  # (-|score|, edge, owner, pointer)
    ranked: dict[int, list[int]] = {}

    def offer(o: int, pointer: int) -> None:
        edges = ranked[o]
        if pointer < len(edges):
            e = edges[pointer]
            heapq.heappush(heap, (-s[e], e, o, pointer))

    def open_node(o: int) -> None:
        ranked[o] = sorted(by_owner.get(o, []), key=lambda e: (-s[e], e))
        offer(o, 0)

    open_node(-1)
    edge_up = g.edge_up.tolist()
    order: list[int] = []
    while heap and len(order) < budget:
        _, e, o, pointer = heapq.heappop(heap)
        offer(o, pointer + 1)
        if chosen[e]:
            continue
        chosen[e] = True
        order.append(e)
        u = edge_up[e]
        if u != 0 and u not in in_circuit:
            in_circuit.add(u)
            open_node(u)
    return order


def prune_circuit(circuit: Circuit) -> Circuit:
    """Drop edges that are not on a path from the input to the logits."""
    g = circuit.graph
    keep = circuit.keep_matrix(torch.bool)  # [n_up, n_down]
    owners = g.downstream_owner()
    inputs_of: list[list[int]] = [[] for _ in range(g.n_upstream)]
    for v, os_ in enumerate(owners):
        for o in os_:
            inputs_of[o].append(v)
    # Forward: which upstream nodes receive, through circuit edges, something from the input.
    alive = torch.zeros(g.n_upstream, dtype=torch.bool, device=HOST)
    alive[0] = True
    for u in range(1, g.n_upstream):
        vs = inputs_of[u]
        alive[u] = bool((keep[:, vs] & alive[:, None]).any())
    # Backward: which upstream nodes feed, through circuit edges, the logits.
    reaches = torch.zeros(g.n_upstream, dtype=torch.bool, device=HOST)
    down_reaches = torch.zeros(g.n_downstream, dtype=torch.bool, device=HOST)
    down_reaches[g.logits_index] = True
    for u in range(g.n_upstream - 1, -1, -1):
        reaches[u] = bool((keep[u] & down_reaches).any())
        if reaches[u]:
            for v in inputs_of[u]:
                down_reaches[v] = True
    edges = circuit.edges & alive[g.edge_up] & down_reaches[g.edge_down]
    info = dict(circuit.info, pruned=True)
    return Circuit(g, edges, model=circuit.model, method=circuit.method, info=info)
