"""The scores a circuit carries with it: each of its edges' score, kept in `circuit.json`.

In memory a `Circuit`'s scores are a float64 tensor over the graph's edges ([n_edges]) and a
`SpanCircuit`'s a dict shaped like its edges: "within" [n_spans, n_edges] and "k", "v", "q" shaped as
its crossing masks; NaN marks an edge without a score. In the JSON file only the circuit's own edges
are written, parallel to the edge lists (docs/formats.md §5):

* `Circuit`: `"scores": {edge name: score}`;
* `SpanCircuit`: `"scores": {"within": {span: [score of each edge of within[span], in order]},
  "crossing": [score of each crossing entry, in order]}`.

An edge without a score is written as null (strict JSON) and read back as NaN.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..devices import HOST
from ..graph import Graph


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _read_number(value, path: Path, where: str, error) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(f"{path}: field 'scores': {where} must be a number or null, not {value!r}")
    return float(value)


def check_same_graph(graph: Graph, scores, error) -> None:
    """`error` unless `scores` (EdgeScores) belong to a graph of `graph`'s shape."""
    if not graph.same_shape(scores.graph):
        raise error(f"scores of another graph ({', '.join(scores.graph.differences(graph))}: the scores' vs "
                    "the circuit's)")


# ------------------------------------------------------------------------------------------------
# Circuit
# ------------------------------------------------------------------------------------------------


def edge_scores_for(graph: Graph, scores, error) -> torch.Tensor:
    """[n_edges] float64 on the host: `scores`' (EdgeScores) score of every edge, summed over spans for
    positional scores."""
    check_same_graph(graph, scores, error)
    return scores.edge_scores().detach().to(device=HOST, dtype=torch.float64)


def circuit_scores_json(names: list[str], edges: torch.Tensor, scores: torch.Tensor) -> dict:
    """{edge name: score or None} for the circuit edges `names` (in the order of `edges.nonzero()`)."""
    return dict(zip(names, (_number(v) for v in scores[edges].tolist())))


def read_circuit_scores(path: Path, data, edge_index: dict[str, int], n_edges: int, error) -> torch.Tensor:
    """The [n_edges] scores of a circuit file's `scores` field (NaN elsewhere)."""
    if not isinstance(data, dict):
        raise error(f"{path}: field 'scores' must be a JSON object of edge name: score")
    out = torch.full((n_edges,), math.nan, dtype=torch.float64, device=HOST)
    for name, value in data.items():
        if name not in edge_index:
            raise error(f"{path}: field 'scores': edge '{name}' is not in a graph of this shape")
        out[edge_index[name]] = _read_number(value, path, f"edge '{name}'", error)
    return out


# ------------------------------------------------------------------------------------------------
# SpanCircuit
# ------------------------------------------------------------------------------------------------


def span_scores_for(circuit, scores, error) -> dict[str, torch.Tensor]:
    """`scores` (EdgeScores) laid out like `circuit`'s (SpanCircuit) edges: positional scores over the
    circuit's spans and query edges, or non-positional scores for a one-span circuit (within edges
    only: crossing edges have no score of their own there)."""
    check_same_graph(circuit.graph, scores, error)
    host = lambda t: t.detach().to(device=HOST, dtype=torch.float64)  # noqa: E731
    if scores.positional:
        if tuple(scores.spans) != tuple(circuit.spans):
            raise error(f"scores over spans {list(scores.spans)} for a circuit over spans {list(circuit.spans)}")
        if scores.query_edges != circuit.query_edges:
            raise error(f"scores with {scores.query_edges} query edges for a circuit with {circuit.query_edges} "
                        "query edges")
        return {"within": host(scores.values), **{k: host(scores.crossing[k]) for k in ("k", "v", "q")}}
    if circuit.n_spans != 1:
        raise error(f"non-positional ({scores.method}) scores for a circuit over {circuit.n_spans} spans")
    out = {"within": host(scores.values)[None]}
    out.update({k: torch.full(v.shape, math.nan, dtype=torch.float64, device=HOST) for k, v in circuit.crossing.items()})
    return out


def span_scores_json(circuit) -> dict:
    """The `scores` field of a span circuit: lists parallel to its `within` lists and `crossing` list
    (`SpanCircuit.to_json` lists crossing entries kind by kind, k, v, q, each in index order)."""
    s = circuit.scores
    within = {span: [_number(v) for v in s["within"][i][circuit.within[i]].tolist()]
              for i, span in enumerate(circuit.spans)}
    crossing = [_number(v) for kind in ("k", "v", "q") for v in s[kind][circuit.crossing[kind]].tolist()]
    return {"within": within, "crossing": crossing}


def read_span_scores(path: Path, data, within_at: dict[int, list[int]], span_index: dict[str, int],
                     crossing_at: list[tuple], shapes: dict[str, tuple], error) -> dict[str, torch.Tensor]:
    """A span circuit file's `scores` field as tensors of `shapes` (NaN elsewhere): `within_at[span]`
    (by span index) holds the edge index of each entry of `within[span]`, `crossing_at` the (kind,
    index) of each crossing entry, in the file's order."""
    if not isinstance(data, dict) or not isinstance(data.get("within"), dict) \
            or not isinstance(data.get("crossing"), list):
        raise error(f"{path}: field 'scores' must be a JSON object with 'within' (span: list of scores) and "
                    "'crossing' (list of scores)")
    out = {k: torch.full(shape, math.nan, dtype=torch.float64, device=HOST) for k, shape in shapes.items()}
    for span, values in data["within"].items():
        if span not in span_index:
            raise error(f"{path}: field 'scores': 'within' has span '{span}', which is not in 'spans'")
        span_i = span_index[span]
        edges = within_at.get(span_i, [])
        if not isinstance(values, list) or len(values) != len(edges):
            raise error(f"{path}: field 'scores': 'within' of span '{span}' must be a list of "
                        f"{len(edges)} scores (one per edge of 'within')")
        for e, value in zip(edges, values):
            out["within"][span_i, e] = _read_number(value, path, f"'within' of span '{span}'", error)
    if len(data["crossing"]) != len(crossing_at):
        raise error(f"{path}: field 'scores': 'crossing' must be a list of {len(crossing_at)} scores (one per "
                    f"entry of 'crossing'), not {len(data['crossing'])}")
    for (kind, index), value in zip(crossing_at, data["crossing"]):
        out[kind][index] = _read_number(value, path, "'crossing'", error)
    return out
