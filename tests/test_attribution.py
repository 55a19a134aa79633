"""Edge attribution (EAP, EAP-IG, exact), circuits and faithfulness on tiny models (docs/method.md §3-§6)."""

from __future__ import annotations

import random

import pytest
import torch
import tiny
from scipy.stats import spearmanr

from mechscope.attribution import attribute
from mechscope.attribution.references import upstream_outputs
from mechscope.attribution.runner import Ablation, graph_hooks
from mechscope.attribution.scores import EdgeScores, ScoresError
from mechscope.circuits.circuit import Circuit, CircuitError, prune_circuit
from mechscope.data import DatasetError, PromptPairDataset, make_pair, schema_for, single_token, tokenizer_fingerprint
from mechscope.circuits.evaluation import evaluate, faithfulness_curve
from mechscope.graph import Graph
from mechscope.metrics import compute_metric, final_logits


def ioi_like(tokenizer, n: int, seed: int = 0) -> PromptPairDataset:
    """IOI-shaped pairs (ABC counterfactual) over names that are single tokens for `tokenizer`."""
    names = [x for x in tiny.NAMES if single_token(tokenizer, " " + x) is not None]
    rng = random.Random(seed)

    def segs(io, s1, s2, place):
        return [("intro", "When"), ("io", " " + io), ("and", " and"), ("s1", " " + s1),
                ("rest", f" went to the {place},"), ("s2", " " + s2), ("end", " gave a drink to")]

    examples = []
    while len(examples) < n:
        a, b, c, d, e = rng.sample(names, 5)
        place = rng.choice(tiny.PLACES)
        examples.append(make_pair(tokenizer, segs(a, b, b, place), segs(c, d, e, place), [" " + a], [" " + b]))
    return PromptPairDataset(examples, schema_for(segs("a", "b", "c", "x")), task="ioi", metric="logit_diff",
                             tokenizer=tokenizer_fingerprint(tokenizer), pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def tiny_data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 12)


def test_graph_counts_for_grouped_query_attention():
    g = Graph(n_layers=2, n_heads=4, n_kv_heads=2)
    assert g.n_upstream == 1 + 2 * (4 + 1)
    assert g.n_downstream == 2 * (4 + 2 + 2 + 1) + 1
    # A head reads nothing from its own layer's heads; the MLP of the same layer does.
    assert not g.edge_mask[g.head_index(0, 1), g.q_slice(0).start]
    assert g.edge_mask[g.head_index(0, 1), g.mlp_in_index(0)]
    assert g.edge_mask[g.mlp_index(0), g.k_slice(1).start]
    assert g.edge_mask[:, g.logits_index].all()


def check_full_and_empty_circuits(model, data, empty_tol, min_gap: float) -> None:
    """The full circuit reproduces the model's logits; with every edge ablated to the counterfactual
    the run equals the model on the counterfactual prompt (docs/method.md §6)."""
    graph = Graph.from_model(model)
    b = data.batch()
    with torch.no_grad():
        clean = model(b.clean, attention_mask=b.attention_mask)
        cf = model(b.counterfactual, attention_mask=b.attention_mask)
        ref = upstream_outputs(model, graph, b.counterfactual, b.attention_mask)
        full = Circuit.full(graph).keep_matrix()
        with graph_hooks(model, graph, ablation=Ablation(full, ref)):
            full_logits = model(b.clean, attention_mask=b.attention_mask)
        with graph_hooks(model, graph, ablation=Ablation(torch.zeros_like(full), ref)):
            empty_logits = model(b.clean, attention_mask=b.attention_mask)
    real = b.attention_mask
    assert (full_logits - clean)[real].abs().max() <= 1e-4
    assert (empty_logits - cf)[real].abs().max() <= empty_tol(cf)
    assert (clean - cf)[real].abs().max() > min_gap  # the check above is not vacuous


def test_full_circuit_reproduces_model_and_empty_circuit_the_ablated_run(tiny_model, tiny_data):
    check_full_and_empty_circuits(tiny_model, tiny_data, empty_tol=lambda cf: 1e-4, min_gap=0.1)


def test_logits_from_the_final_residual_match_the_model(tiny_model, tiny_data):
    check_final_residual_logits(tiny_model, tiny_data)


def check_final_residual_logits(model, data):
    """The final norm and unembedding applied to the final residual give the model's last logits."""
    from mechscope.attribution.runner import run_to_final_logits

    graph, b = Graph.from_model(model), data.batch()
    with torch.no_grad():
        expected = final_logits(model(b.clean, attention_mask=b.attention_mask), b.last)
        with graph_hooks(model, graph, stop_at_final=True) as run:
            got = run_to_final_logits(model, run, b.clean, b.attention_mask, b.last)
    assert (got - expected).abs().max() <= 1e-4


def jvp_edge_derivatives(model, data, edges, hooks=()) -> dict[int, float]:
    """For each edge e, d/d(eps) M when that edge's input moves by eps * (ref_u - z_u): a forward-mode
    derivative through the exact-ablation path, with `hooks` (extra forward hooks) active."""
    graph, b = Graph.from_model(model), data.batch()
    ref = upstream_outputs(model, graph, b.counterfactual, b.attention_mask)
    out = {}
    for e in edges:
        onehot = torch.zeros(graph.n_upstream, graph.n_downstream)
        onehot[graph.edge_up[e], graph.edge_down[e]] = 1.0

        def metric_with_edge_scaled(eps):
            ablation = Ablation(1 - eps * onehot, ref)
            with model.hooks(fwd_hooks=list(hooks)), graph_hooks(model, graph, ablation=ablation):
                logits = final_logits(model(b.clean, attention_mask=b.attention_mask), b.last)
            return compute_metric("logit_diff", logits, b).mean()

        _, derivative = torch.func.jvp(metric_with_edge_scaled, (torch.tensor(0.0),), (torch.tensor(1.0),))
        out[e] = float(derivative.detach())
    return out


def check_eap_matches_jvp(model, data, edges, atol: float = 0.0, hooks=()) -> None:
    """Each EAP edge score equals the jvp derivative of `jvp_edge_derivatives` (independent of EAP's
    gradients)."""
    scores = attribute(model, data, "eap", progress=False)
    for e, expected in jvp_edge_derivatives(model, data, edges(scores), hooks).items():
        got = float(scores.values[e])
        assert abs(got - expected) <= 1e-5 * max(abs(expected), 1e-3) + atol, scores.graph.edge_name(e)


def test_eap_equals_first_order_change_from_jvp(tiny_model, tiny_data):
    check_eap_matches_jvp(tiny_model, tiny_data[:4], lambda s: random.Random(1).sample(range(s.graph.n_edges), 6))


def test_estimators_rank_edges_like_exact_patching(tiny_model, tiny_data):
    exact = attribute(tiny_model, tiny_data, "exact", progress=False)
    eap = attribute(tiny_model, tiny_data, "eap", progress=False)
    ig = attribute(tiny_model, tiny_data, "eap-ig", steps=5, progress=False)
    rho_eap = spearmanr(eap.values, exact.values).correlation
    rho_ig = spearmanr(ig.values, exact.values).correlation
    print(f"spearman vs exact: eap={rho_eap:.3f} eap-ig={rho_ig:.3f}")
    assert rho_eap > 0.6 and rho_ig > 0.6


def test_node_score_is_sum_of_outgoing_edges(tiny_model, tiny_data):
    scores = attribute(tiny_model, tiny_data[:4], "eap", progress=False)
    dense = scores.graph.dense(scores.values)
    assert torch.allclose(scores.node_scores(), dense.sum(1), atol=1e-6)


def test_scores_and_circuits_round_trip(tmp_path, tiny_model, tiny_data):
    scores = attribute(tiny_model, tiny_data[:4], "eap-ig", steps=3, progress=False)
    scores.save(tmp_path / "s.safetensors")
    again = EdgeScores.load(tmp_path / "s.safetensors")
    assert torch.equal(again.values, scores.values) and again.method == "eap-ig" and again.info == {"steps": 3}
    circuit = scores.top_n(20)
    circuit.save(tmp_path / "c.json")
    loaded = Circuit.load(tmp_path / "c.json")
    assert torch.equal(loaded.edges, circuit.edges)
    a = evaluate(tiny_model, circuit, tiny_data, progress=False)
    b = evaluate(tiny_model, loaded, tiny_data, progress=False)
    assert a == b


def test_selection_sizes_and_pruning(tiny_model, tiny_data):
    scores = attribute(tiny_model, tiny_data[:4], "eap", progress=False)
    g = scores.graph
    for n in (1, 5, 30):
        top = scores.top_n(n, prune=False)
        assert top.n_edges == n
        pruned = prune_circuit(top)
        assert pruned.n_edges <= n and (pruned.edges <= top.edges).all()
        greedy = scores.greedy(n)
        assert greedy.n_edges <= n
    # After pruning, every upstream node with an edge is reachable from the input and every circuit
    # edge's child feeds the logits: re-pruning changes nothing.
    c = scores.greedy(30)
    assert torch.equal(prune_circuit(c).edges, c.edges)
    assert Circuit.full(g).n_edges == g.n_edges and prune_circuit(Circuit.full(g)).n_edges == g.n_edges


def test_greedy_order_equals_a_naive_greedy():
    """The k-way-merge greedy order equals the definition (§5): at each step the edge of largest |score|
    (lowest index on ties) among those whose child belongs to the logits or to a node already in the
    circuit; each of a curve's greedy circuits is the pruned prefix of that one order."""
    from mechscope.circuits.circuit import greedy, greedy_order
    from mechscope.circuits.evaluation import select_circuits

    g = Graph(n_layers=3, n_heads=4, n_kv_heads=2)
    gen = torch.Generator().manual_seed(0)
    values = (torch.randn(g.n_edges, generator=gen, dtype=torch.float64) * 4).round() / 4  # many ties
    scores = EdgeScores(g, values, "eap", "logit_diff", "counterfactual", "tiny", 4)
    owners = g.downstream_owner()
    open_owners, naive = {-1}, []
    for _ in range(g.n_edges):
        ready = [e for e in range(g.n_edges) if e not in naive
                 and any(o in open_owners for o in (owners[int(g.edge_down[e])] or [-1]))]
        if not ready:
            break
        best = min(ready, key=lambda e: (-abs(float(values[e])), e))
        naive.append(best)
        if int(g.edge_up[best]) != 0:
            open_owners.add(int(g.edge_up[best]))
    assert greedy_order(scores, g.n_edges) == naive
    fractions = [0.05, 0.3, 1.0]
    for f, c in zip(fractions, select_circuits(scores, fractions, "greedy")):
        n = max(1, round(f * g.n_edges))
        assert torch.equal(c.edges, greedy(scores, n).edges)
        assert torch.equal(c.edges, prune_circuit(Circuit(g, torch.isin(torch.arange(g.n_edges),
                                                                         torch.tensor(naive[:n])))).edges)


def test_faithfulness_curve_end_points(tiny_model, tiny_data):
    scores = attribute(tiny_model, tiny_data, "eap", progress=False)
    curve = faithfulness_curve(tiny_model, scores, tiny_data, fractions=(0.01, 0.1, 0.5, 1.0), progress=False)
    last = curve.points[-1]
    assert last.n_edges == scores.graph.n_edges
    assert abs(last.normalized - 1) < 1e-4 and abs(last.soft - 1) < 1e-4 and last.hard == 1.0
    empty = evaluate(tiny_model, Circuit.empty(scores.graph), tiny_data, progress=False)
    assert abs(empty.normalized) < 1e-4
    assert 0 <= curve.cmd and curve.cpr == pytest.approx(
        sum((b.fraction - a.fraction) * (a.normalized + b.normalized) / 2 for a, b in zip(curve.points, curve.points[1:]))
    )


@pytest.mark.parametrize("ablation", ["mean", "zero"])
def test_other_ablations_keep_identities(tiny_model, tiny_data, ablation):
    scores = attribute(tiny_model, tiny_data[:6], "eap", ablation=ablation, progress=False)
    assert torch.isfinite(scores.values).all() and scores.values.abs().sum() > 0
    from mechscope.circuits.evaluation import _Evaluator

    # The plain ablated passes (no shortcuts): the full circuit is the model, the empty one the ablated run.
    full, empty = _Evaluator(tiny_model, tiny_data[:6], ablation, None, 4, shortcuts=False).run(
        [Circuit.full(scores.graph), Circuit.empty(scores.graph)], progress=False)
    assert full.normalized == pytest.approx(1.0, abs=1e-4) and full.metric_circuit != full.metric_empty
    assert empty.normalized == pytest.approx(0.0, abs=1e-4)


def test_bad_inputs(tmp_path, tiny_model, tiny_data, tiny_model_dirs, tiny_tokenizer):
    with pytest.raises(DatasetError, match="no examples"):
        attribute(tiny_model, tiny_data[:0], "eap", progress=False)
    other_tok = tiny.build_tokenizer(vocab_size=400)
    foreign = ioi_like(other_tok, 2)
    with pytest.raises(DatasetError, match="another tokenizer"):
        attribute(tiny_model, foreign, "eap", progress=False)
    with pytest.raises(ValueError, match="unknown method"):
        attribute(tiny_model, tiny_data, "acdc", progress=False)
    wrong_shape = Circuit.full(Graph(n_layers=3, n_heads=4, n_kv_heads=4))
    with pytest.raises(CircuitError, match="built for a model of another shape .*layers 3 vs 2"):
        evaluate(tiny_model, wrong_shape, tiny_data, progress=False)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CircuitError, match="bad.json: not valid JSON"):
        Circuit.load(tmp_path / "bad.json")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ScoresError, match="not a mechscope scores file"):
        EdgeScores.load(tmp_path / "bad.safetensors")


# --------------------------------------------------------------------------------------------------
# The same identities on the packaged SmolLM2 (slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_ioi(smollm2):
    from mechscope.tasks import make_task

    return make_task("ioi", smollm2.tokenizer, 4, seed=1)


@pytest.mark.slow
def test_smollm2_full_and_empty_circuits(smollm2, smol_ioi):
    # 30 layers of float32 sums: the tolerance is relative to the size of the logits.
    check_full_and_empty_circuits(smollm2, smol_ioi, empty_tol=lambda cf: 1e-3 * cf.abs().max(), min_gap=1.0)


@pytest.mark.slow
def test_smollm2_eap_equals_jvp(smollm2, smol_ioi):
    check_eap_matches_jvp(
        smollm2, smol_ioi[:1], lambda s: (int(s.values.abs().argmax()), s.graph.n_edges // 3), atol=1e-6
    )
