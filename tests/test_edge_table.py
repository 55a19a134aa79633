"""The vectorised span-edge table against a naive loop over every kept edge of the circuits."""

from __future__ import annotations

import math

import pytest
import torch

import mechscope
from mechscope.attribution import attribute
from mechscope.circuits.circuit import Circuit, CircuitError, top_n
from mechscope.circuits.edge_table import KINDS, circuit_edges, score_edges
from mechscope.circuits.span_circuit import SpanCircuit, span_greedy
from mechscope.graph import Graph
from mechscope.tasks import make_task


def naive_rows(circuit: SpanCircuit, scores, counts) -> dict[tuple, tuple]:
    """(parent, child, kind, key span) -> (score, concrete), one loop step per kept edge."""
    g, spans = circuit.graph, circuit.spans
    rows = {}

    def down_name(v: int) -> str:
        name = g.downstream_names[v]
        return name[:-3] if name.endswith(".in") else name

    for s, e in circuit.within.nonzero().tolist():
        u, v = int(g.edge_up[e]), int(g.edge_down[e])
        score = float(scores.values[s, e]) if scores.positional else float(scores.values[e])
        concrete = float(counts["last"][s] if v == g.logits_index else counts["within"][s]) if counts else math.nan
        rows[(f"{g.upstream_names[u]}@{spans[s]}", f"{down_name(v)}@{spans[s]}", "within", None)] = (score, concrete)
    for kind in ("k", "v", "q"):
        for idx in circuit.crossing[kind].nonzero().tolist():
            l, h, b = idx[0], idx[1], idx[-1]
            a = idx[2] if len(idx) == 4 else None
            if kind == "q":
                parent = f"a{l}.h{h}.q@{spans[b]}"
            else:
                parent = f"a{l}.g{h // g.group_size}.{kind}@{spans[a]}"
            score = float(scores.crossing[kind][tuple(idx)]) if scores.positional else math.nan
            if not counts:
                concrete = math.nan
            else:
                concrete = float(counts["within"][b] if a is None else counts["crossing"][a, b])
            rows[(parent, f"a{l}.h{h}@{spans[b]}", kind, None if a is None or kind != "q" else spans[a])] = \
                (score, concrete)
    return rows


def table_rows(edges) -> dict[tuple, tuple]:
    names, spans = edges.nodes.names, edges.spans
    out = {}
    for p, c, k, a, s, n in zip(edges.parent.tolist(), edges.child.tolist(), edges.kind.tolist(),
                                edges.key_span.tolist(), edges.score.tolist(), edges.concrete.tolist()):
        kind = KINDS[k]
        out[(names[p], names[c], kind, spans[a] if kind == "q" and a >= 0 else None)] = (s, n)
    return out


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        for x, y in zip(a[key], b[key]):
            assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6, abs=1e-9), key


@pytest.fixture(scope="module")
def llama(tiny_model_dirs):
    model = mechscope.load_model(str(tiny_model_dirs["llama"]), device="cpu")
    data = make_task("ioi", model.tokenizer, 6, seed=0)
    return model, data


@pytest.mark.parametrize("query_edges", ["per_key", "whole_row"])
def test_circuit_edges_equal_a_naive_loop(llama, query_edges):
    model, data = llama
    scores = attribute(model, data, "peap", batch_size=6, progress=False, query_edges=query_edges)
    small, large = span_greedy(scores, 40), span_greedy(scores, 400)
    edges = circuit_edges([small, large], scores)
    for i, c in enumerate((small, large)):
        same(table_rows(edges.in_circuit(i)), naive_rows(c, scores, scores.concrete))
    assert len(edges) == len(naive_rows(large, scores, scores.concrete) | naive_rows(small, scores, scores.concrete))
    finite = edges.score[~edges.score.isnan()].abs()
    assert torch.all(finite[:-1] >= finite[1:])  # largest |score| first
    assert len(set(edges.names())) == len(edges)


def test_score_edges_cover_the_span_graph(llama):
    model, data = llama
    scores = attribute(model, data, "peap", batch_size=6, progress=False)
    edges = score_edges(scores)
    full = SpanCircuit.full(scores.graph, scores.spans, scores.concrete["last"] > 0)
    assert len(edges) == full.n_edges
    same(table_rows(edges), naive_rows(full, scores, scores.concrete))


def test_non_positional_circuit_edges(llama):
    model, data = llama
    scores = attribute(model, data, "eap", batch_size=6, progress=False)
    circuit = top_n(scores, 60)
    edges = circuit_edges([circuit], scores)
    span = SpanCircuit.from_circuit(circuit)
    same(table_rows(edges), naive_rows(span, scores, None))
    assert edges.spans == ("*",)
    assert torch.isnan(edges.score[edges.kind > 0]).all()  # crossing edges have no score of their own


def test_circuits_over_other_graphs_are_refused(llama):
    model, data = llama
    scores = attribute(model, data, "peap", batch_size=6, progress=False)
    other = Circuit.full(Graph(2, 2, 1))
    with pytest.raises(CircuitError, match="another span graph"):
        circuit_edges([span_greedy(scores, 30), other])
    with pytest.raises(CircuitError, match="scores are for graph"):
        circuit_edges([other], scores)
    with pytest.raises(CircuitError, match="no circuits"):
        circuit_edges([])
