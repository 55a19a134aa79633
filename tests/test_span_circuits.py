"""Span circuits (PEAP, docs/method.md §4-§6): selection, pruning, projection, exact evaluation with crossing
edges ablated inside attention, concrete edge counts, save/reload."""

from __future__ import annotations

import pytest
import torch
from test_attribution import ioi_like

from mechscope.attribution import attribute
from mechscope.attribution.attention import attention_scale, qkv_hook_names, score_soft_cap
from mechscope.attribution.peap import batch_span_of
from mechscope.attribution.references import upstream_and_attention
from mechscope.attribution.runner import Ablation, AttentionAblation, graph_hooks
from mechscope.circuits.circuit import Circuit, CircuitError
from mechscope.circuits.evaluation import _Evaluator, evaluate, faithfulness_curve
from mechscope.graph import Graph
from mechscope.metrics import compute_metric, final_logits
from mechscope.circuits.span_circuit import (
    SpanCircuit,
    SpanGraphScores,
    load_any_circuit,
    prune_span_circuit,
    span_greedy,
    span_greedy_order,
    span_top_n,
)


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 8, seed=3)


@pytest.fixture(scope="module")
def peap(tiny_model, data):
    return attribute(tiny_model, data, "peap", progress=False)


@pytest.mark.parametrize("ablation", ["counterfactual", "mean"])
def test_full_span_circuit_is_the_model_and_empty_one_the_ablated_run(tiny_model, data, peap, ablation):
    g = peap.graph
    logit_spans = SpanGraphScores(peap).logit_spans
    full = SpanCircuit.full(g, data.schema.spans, logit_spans)
    empty = SpanCircuit.empty(g, data.schema.spans, logit_spans)
    # Without shortcuts: the full circuit and M(empty) are ablated passes, not the clean / reference runs.
    r_full, r_empty, r_dense_empty = _Evaluator(tiny_model, data, ablation, None, 4, shortcuts=False).run(
        [full, empty, Circuit.empty(g)], progress=False)
    assert r_full.metric_circuit == pytest.approx(r_full.metric_model, abs=1e-5)
    assert r_empty.metric_circuit == pytest.approx(r_full.metric_empty, abs=1e-5)
    assert r_empty.metric_circuit == pytest.approx(r_dense_empty.metric_circuit, abs=1e-6)
    assert abs(r_full.metric_model - r_full.metric_empty) > 1e-3  # not vacuous


@pytest.mark.parametrize("ablation", ["counterfactual", "mean"])
def test_evaluation_shortcuts_change_nothing(tiny_model, data, peap, ablation):
    """The evaluator's shortcuts (the full circuit is the clean run; with the counterfactual reference
    the all-ablated run is the counterfactual run) and its sparse corrections give what the plain
    ablated passes give."""
    from mechscope.circuits.evaluation import select_circuits

    eap = attribute(tiny_model, data, "eap", progress=False)
    fractions = [0.01, 0.3, 1.0]
    circuits = select_circuits(peap, fractions, "greedy") + select_circuits(eap, fractions, "top_n")
    fast = _Evaluator(tiny_model, data, ablation, None, 4).run(circuits, progress=False)
    slow = _Evaluator(tiny_model, data, ablation, None, 4, shortcuts=False).run(circuits, progress=False)
    for a, b in zip(fast, slow):
        for key in ("metric_circuit", "metric_model", "metric_empty", "hard", "circuit_accuracy"):
            assert getattr(a, key) == pytest.approx(getattr(b, key), rel=1e-5, abs=1e-6), key
    assert fast[2].metric_circuit == fast[2].metric_model  # the full span circuit took the shortcut


def test_non_positional_circuit_as_span_circuit_evaluates_the_same(tiny_model, data):
    eap = attribute(tiny_model, data, "eap", progress=False)
    circuit = eap.greedy(60)
    dense, span = _Evaluator(tiny_model, data, "counterfactual", None, 4).run(
        [circuit, SpanCircuit.from_circuit(circuit)], progress=False)
    for key in ("metric_circuit", "soft", "hard", "normalized", "concrete_edges"):
        # (normalized divides by M(model) - M(empty), small for a random model: relative tolerance)
        assert getattr(span, key) == pytest.approx(getattr(dense, key), rel=1e-4, abs=1e-5), key
    assert dense.metric_circuit != pytest.approx(dense.metric_model, abs=1e-4)


def test_single_span_peap_greedy_equals_eap_greedy_end_to_end(tiny_model, data):
    one = data.single_span()
    eap = attribute(tiny_model, data, "eap", progress=False)
    peap = attribute(tiny_model, one, "peap", progress=False)
    for n in (10, 40, 150):
        expected = eap.greedy(n)
        got = span_greedy(peap, n, attention="whole")
        assert torch.equal(got.within[0], expected.edges), n
    got = span_greedy(peap, 40, attention="whole")
    a, b = _Evaluator(tiny_model, one, "counterfactual", None, 4).run([eap.greedy(40), got], progress=False)
    assert a.metric_circuit == pytest.approx(b.metric_circuit, abs=1e-5)
    assert a.normalized == pytest.approx(b.normalized, rel=1e-4)


def naive_crossing_ablated_logits(model, data, index, layer, head, kind, key_span, query_span):
    """Logits with one crossing edge type of one head ablated between two spans, computed by hand:
    the head's output at each query position of `query_span` is recomputed with an explicit loop in
    which the keys (or values) at positions of `key_span` come from the counterfactual, or the query
    does in its scores against the keys of `key_span` (kind "q") or against every key ("q_row")."""
    batch = data.batch([index])
    qn, kn, vn = qkv_hook_names(model, layer)
    span = data.examples[index].span_of_positions()
    _, cf = model.run_with_cache(batch.counterfactual, attention_mask=batch.attention_mask)
    store = {}
    scale, n_heads = attention_scale(model), model.cfg.n_heads

    def grab(value, hook):
        store[hook.name] = value.detach()
        return value

    def replace(z, hook):
        z = z.clone()
        group = head // (n_heads // store[kn].shape[2])
        q, k, v = store[qn][0, :, head], store[kn][0, :, group], store[vn][0, :, group]
        q2, k2, v2 = cf[qn][0, :, head], cf[kn][0, :, group], cf[vn][0, :, group]
        for t in range(z.shape[1]):
            if span[t] != query_span:
                continue
            logits = []
            for j in range(t + 1):
                swap = kind == "k" and span[j] == key_span
                q_t = q2[t] if kind == "q_row" or (kind == "q" and span[j] == key_span) else q[t]
                logits.append(q_t @ (k2[j] if swap else k[j]) * scale)
            w = torch.stack(logits).softmax(0)
            out = 0
            for j in range(t + 1):
                swap = kind == "v" and span[j] == key_span
                out = out + w[j] * (v2[j] if swap else v[j])
            z[0, t, head] = out
        return z

    hooks = [(n, grab) for n in (qn, kn, vn)] + [(f"blocks.{layer}.attn.hook_z", replace)]
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        return final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)


def test_crossing_edge_ablation_equals_a_naive_head_recomputation(tiny_model, data, peap):
    g = peap.graph
    spans = data.schema.spans
    index = 2
    batch = data.batch([index])
    span_of = batch_span_of(data, [index], batch.clean.shape[1])
    with torch.no_grad():
        ref_up, cf_attn = upstream_and_attention(tiny_model, g, batch.counterfactual, batch.attention_mask)
        clean = final_logits(tiny_model(batch.clean, attention_mask=batch.attention_mask), batch.last)
    last = len(spans) - 1
    # per-key query edges against the BOS key's span, a name and the last span itself; a whole-row one
    cases = [("k", spans.index("s1"), last), ("v", spans.index("io"), last), ("q", 0, last),
             ("q", spans.index("io"), last), ("q", last, last), ("q", spans.index("s1"), spans.index("s2")),
             ("q_row", last, last), ("k", spans.index("io"), spans.index("s2"))]
    changed = {}
    for layer in range(g.n_layers):
        for kind, key_span, query_span in cases:
            if kind == "q_row":
                c = SpanCircuit.full(g, spans, query_edges="whole_row")
                c.crossing["q"][layer, 1, query_span] = False
            else:
                c = SpanCircuit.full(g, spans)
                c.crossing[kind][layer, 1, key_span, query_span] = False
            within, (kk, kv, kq) = c.projection(span_of)
            att = AttentionAblation(kk, kv, kq, cf_attn, attention_scale(tiny_model), score_soft_cap(tiny_model))
            with torch.no_grad(), graph_hooks(tiny_model, g, ablation=Ablation(within, ref_up, span_of, att),
                                              attention_mask=batch.attention_mask):
                got = final_logits(tiny_model(batch.clean, attention_mask=batch.attention_mask), batch.last)
            want = naive_crossing_ablated_logits(tiny_model, data, index, layer, 1, kind, key_span, query_span)
            assert (got - want).abs().max() <= 1e-5, (layer, kind, key_span, query_span)
            key = (kind, key_span, query_span)
            changed[key] = max(changed.get(key, 0.0), float((want - clean).abs().max()))
    # Not vacuous: every case changes the logits in some layer (a layer-0 query at a span whose
    # tokens the counterfactual shares may not).
    assert min(changed.values()) > 1e-4, changed


def test_one_per_key_query_edge_ablated_by_evaluation_equals_a_naive_recomputation(tiny_model, data):
    """The evaluation path (`_Evaluator`, as `evaluate` and the curves run it) with exactly one per-key
    query span edge ablated gives the metric of the naive loop that swaps that head's query in its
    scores against that key span only."""
    g = Graph.from_model(tiny_model)
    spans = data.schema.spans
    index, layer, head = 2, g.n_layers - 1, 1
    one = data[index:index + 1]
    last, io = len(spans) - 1, spans.index("io")
    c = SpanCircuit.full(g, spans)
    c.crossing["q"][layer, head, io, last] = False
    assert c.n_crossing == SpanCircuit.full(g, spans).n_crossing - 1
    result = _Evaluator(tiny_model, one, "counterfactual", None, 4).run([c], progress=False)[0]
    logits = naive_crossing_ablated_logits(tiny_model, data, index, layer, head, "q", io, last)
    want = float(compute_metric(data.metric, logits, one.batch()).sum())
    assert result.metric_circuit == pytest.approx(want, abs=1e-5)
    assert abs(result.metric_circuit - result.metric_model) > 1e-4  # the edge matters


def test_pruning_keeps_only_paths_from_input_to_logits(peap, data):
    g = peap.graph
    spans = data.schema.spans
    last = len(spans) - 1
    c = SpanCircuit.empty(g, spans)
    head = g.head_index(g.n_layers - 1, 0)
    logits_edge = int(((g.edge_up == head) & (g.edge_down == g.logits_index)).nonzero())
    c.within[last, logits_edge] = True
    assert prune_span_circuit(c).n_edges == 0  # the head receives nothing: a dead edge
    q_node = g.q_slice(g.n_layers - 1).start
    input_q = int(((g.edge_up == 0) & (g.edge_down == q_node)).nonzero())
    c.within[last, input_q] = True
    assert prune_span_circuit(c).n_edges == 0  # the query reaches the head only through its crossing edge
    c.crossing["q"][g.n_layers - 1, 0, 0, last] = True  # the query at `last` against the first span's keys
    pruned = prune_span_circuit(c)
    assert pruned.n_edges == 3 and pruned.n_within == 2 and bool(pruned.crossing["q"][g.n_layers - 1, 0, 0, last])
    whole = SpanCircuit.empty(g, spans, query_edges="whole_row")  # the same path, whole-row query edge
    whole.within = c.within.clone()
    whole.crossing["q"][g.n_layers - 1, 0, last] = True
    assert prune_span_circuit(whole).n_edges == 3
    # A path at another span than the one the logits read at is dead too.
    c2 = SpanCircuit.empty(g, spans)
    c2.within[0, logits_edge] = True
    c2.within[0, input_q] = True
    c2.crossing["q"][g.n_layers - 1, 0, 0, 0] = True
    c2.logit_spans = torch.zeros(len(spans), dtype=torch.bool)
    c2.logit_spans[last] = True
    assert prune_span_circuit(c2).n_edges == 0


def test_greedy_circuits_grow_from_the_logits_and_are_nested(peap):
    order = span_greedy_order(peap, 300)
    assert len(order) == 300
    assert order[0][0] == "w"  # the first edge feeds the logits
    small, big = span_greedy(peap, 50), span_greedy(peap, 200)
    assert small.n_edges <= 50 and big.n_edges <= 200
    assert bool((small.within <= big.within).all())
    assert big.n_crossing > 0 and big.n_within > 0
    again = prune_span_circuit(big)
    assert torch.equal(again.within, big.within)
    top = span_top_n(peap, 200)
    assert top.n_edges <= 200


def test_concrete_edges_count_token_level_edges(peap, data):
    g = peap.graph
    full = SpanCircuit.full(g, data.schema.spans, SpanGraphScores(peap).logit_spans)
    counted = full.concrete_edges(data)
    n_logit = int((g.edge_down == g.logits_index).sum())
    expected_within = expected_crossing = expected_whole_row = 0.0
    for ex in data.examples:
        t = len(ex)
        expected_within += (g.n_edges - n_logit) * t + n_logit
        expected_crossing += g.n_layers * g.n_heads * 3 * t * (t + 1) / 2  # k, v, per-key q: causal pairs
        expected_whole_row += g.n_layers * g.n_heads * (2 * t * (t + 1) / 2 + t)  # a whole-row q: t
    assert counted["within"] == pytest.approx(expected_within / len(data))
    assert counted["crossing"] == pytest.approx(expected_crossing / len(data))
    whole = SpanCircuit.full(g, data.schema.spans, SpanGraphScores(peap).logit_spans, query_edges="whole_row")
    assert whole.concrete_edges(data)["crossing"] == pytest.approx(expected_whole_row / len(data))
    # A non-positional circuit on one span counts every position of each edge.
    circuit = Circuit.full(g)
    assert SpanCircuit.from_circuit(circuit).concrete_edges(data)["total"] == pytest.approx(counted["total"])


def test_span_circuit_round_trip_evaluates_the_same(tmp_path, tiny_model, data, peap):
    c = span_greedy(peap, 120)
    path = c.save(tmp_path / "c.json")
    again = load_any_circuit(path)
    assert isinstance(again, SpanCircuit)
    assert torch.equal(again.within, c.within) and again.spans == c.spans
    for key in ("k", "v", "q"):
        assert torch.equal(again.crossing[key], c.crossing[key])
    assert again.query_edges == "per_key" and c.to_json()["format"] == "mechscope-span-circuit/2"
    a = evaluate(tiny_model, c, data, progress=False)
    b = evaluate(tiny_model, again, data, progress=False)
    assert a.to_dict() == b.to_dict()
    # Whole-row query edges are written in format /1, the format of files before per-key edges.
    row = span_greedy(attribute(tiny_model, data, "peap", progress=False, query_edges="whole_row"), 300)
    assert row.query_edges == "whole_row" and row.crossing["q"].any()
    assert row.to_json()["format"] == "mechscope-span-circuit/1"
    again = load_any_circuit(row.save(tmp_path / "r.json"))
    assert again.query_edges == "whole_row" and torch.equal(again.crossing["q"], row.crossing["q"])
    # A non-positional circuit file still loads as a Circuit.
    assert isinstance(load_any_circuit(Circuit.full(peap.graph).save(tmp_path / "d.json")), Circuit)


def test_span_circuit_refuses_other_schemas_and_bad_files(tmp_path, tiny_model, data, peap):
    c = span_greedy(peap, 30)
    with pytest.raises(CircuitError, match="does not fit a dataset with schema"):
        evaluate(tiny_model, c, data.single_span(), progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "mechscope-span-circuit/1", "graph": {"n_layers": 1}}')
    with pytest.raises(CircuitError, match="not a mechscope span circuit"):
        SpanCircuit.load(bad)
    data_ = c.to_json()
    data_["within"][data.schema.spans[-1]] = ["a0.h0->nowhere"]
    bad.write_text(__import__("json").dumps(data_))
    with pytest.raises(CircuitError, match="nowhere"):
        SpanCircuit.load(bad)


def test_positional_curve_reports_concrete_edges(tiny_model, data, peap):
    curve = faithfulness_curve(tiny_model, peap, data, fractions=(0.01, 0.2, 1.0), selection="greedy",
                               progress=False)
    assert [p.fraction for p in curve.points] == [0.01, 0.2, 1.0]
    concrete = [p.concrete_edges for p in curve.points]
    assert concrete == sorted(concrete) and concrete[1] > 0
    assert concrete[-1] == pytest.approx(curve.concrete_full)
    assert curve.points[-1].normalized == pytest.approx(1.0, abs=1e-4)
    assert Graph.from_model(tiny_model).same_shape(peap.graph)


@pytest.mark.slow
def test_smollm2_span_circuit_identities(smollm2):
    """On the packaged model (rotary, grouped-query attention): the full span circuit is the model,
    the empty one the counterfactual run, and ablating one crossing edge type of a late head equals
    the naive recomputation of that head."""
    from mechscope.tasks import make_task

    data = make_task("ioi", smollm2.tokenizer, 4, seed=2)
    peap = attribute(smollm2, data, "peap", progress=False)
    g, spans = peap.graph, data.schema.spans
    logit_spans = SpanGraphScores(peap).logit_spans
    full = SpanCircuit.full(g, spans, logit_spans)
    empty = SpanCircuit.empty(g, spans, logit_spans)
    r_full, r_empty = _Evaluator(smollm2, data, "counterfactual", None, 4, shortcuts=False).run(
        [full, empty], progress=False)
    assert r_full.metric_circuit == pytest.approx(r_full.metric_model, abs=1e-4)
    assert r_empty.metric_circuit == pytest.approx(r_full.metric_empty, abs=1e-3)
    assert r_full.metric_model - r_full.metric_empty > 1.0

    index, layer, head = 1, 20, 4
    batch = data.batch([index])
    span_of = batch_span_of(data, [index], batch.clean.shape[1])
    with torch.no_grad():
        ref_up, cf_attn = upstream_and_attention(smollm2, g, batch.counterfactual, batch.attention_mask)
    last = len(spans) - 1
    for kind, key_span in (("k", spans.index("name_1")), ("v", spans.index("s2")), ("q", 0),
                           ("q", spans.index("name_1")), ("q_row", last)):
        if kind == "q_row":
            c = SpanCircuit.full(g, spans, query_edges="whole_row")
            c.crossing["q"][layer, head, last] = False
        else:
            c = SpanCircuit.full(g, spans)
            c.crossing[kind][layer, head, key_span, last] = False
        within, (kk, kv, kq) = c.projection(span_of)
        att = AttentionAblation(kk, kv, kq, cf_attn, attention_scale(smollm2), score_soft_cap(smollm2))
        with torch.no_grad(), graph_hooks(smollm2, g, ablation=Ablation(within, ref_up, span_of, att),
                                          attention_mask=batch.attention_mask):
            got = final_logits(smollm2(batch.clean, attention_mask=batch.attention_mask), batch.last)
        want = naive_crossing_ablated_logits(smollm2, data, index, layer, head, kind, key_span, last)
        assert (got - want).abs().max() <= 1e-3 * want.abs().max(), kind
