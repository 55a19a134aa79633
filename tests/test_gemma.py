"""Edge attribution on Gemma-3: norms after each sublayer, split by freezing their scales
(mechscope.attribution.post_norm; method.md §2), on a tiny random Gemma-3 (fast) and the packaged
Gemma-3-270M (slow). The identities are those of the other architectures: the full circuit is the
model, the empty circuit the counterfactual run, EAP the first-order change (with the post-norm scales
held at their clean values in the independent jvp as well), PEAP's spans sum to EAP and its crossing
scores equal a hand recomputation of the head."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
from test_attribution import (
    check_eap_matches_jvp,
    check_final_residual_logits,
    check_full_and_empty_circuits,
    ioi_like,
    jvp_edge_derivatives,
)
from test_peap import (
    CROSSING_CASES,
    check_attribution_crossing_matches_stand_alone,
    crossing_value,
    frozen_scale_hooks,
    naive_crossing,
    post_norm_scales,
)

from mechscope.attribution import attribute
from mechscope.attribution.attention import attention_scale, check_supported, qkv_hook_names
from mechscope.attribution.peap import crossing_scores
from mechscope.attribution.references import upstream_outputs
from mechscope.graph import Graph


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 8, seed=3)


@pytest.fixture(autouse=True)
def _quiet_scale_edits():
    # Holding a norm's scale at a stored value makes the bridge warn that it leaves its fast path.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*hook_scale.*")
        yield


def check_head_writes_sum_to_attention_output(model, data):
    """Each head's write is w1 * (z_h @ W_O[h]) / r; the heads' writes sum to the layer's
    post-normed attention output (hook_attn_out) and the MLP node is the post-normed MLP output."""
    graph, b = Graph.from_model(model), data.batch()
    up = upstream_outputs(model, graph, b.clean, b.attention_mask)
    _, cache = model.run_with_cache(b.clean, attention_mask=b.attention_mask)
    for layer in range(graph.n_layers):
        heads = up[graph.upstream_slice(layer)].sum(0)
        attn_out = cache[f"blocks.{layer}.hook_attn_out"]
        assert (heads - attn_out).abs().max() <= 1e-5 * attn_out.abs().max()
        assert torch.equal(up[graph.mlp_index(layer)], cache[f"blocks.{layer}.hook_mlp_out"])
        # Not the plain sum of the heads' results: the norm matters here.
        plain = torch.einsum("bthe,hed->btd", cache[f"blocks.{layer}.attn.hook_z"], model.W_O[layer])
        assert (plain - attn_out).abs().max() > 1e-2 * attn_out.abs().max()


def check_attention_hooks_reproduce_scores(model, data):
    """The hooks PEAP computes heads from (q after q-norm and rotary, k likewise) times the model's
    scale (query_pre_attn_scalar**-0.5) give the model's attention scores, in every layer."""
    b = data.batch([0])
    _, cache = model.run_with_cache(b.clean, attention_mask=b.attention_mask)
    t = b.clean.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    scalar = model.original_model.config.query_pre_attn_scalar
    assert attention_scale(model) == pytest.approx(1 / math.sqrt(scalar))
    for layer in range(model.cfg.n_layers):
        qn, kn, _ = qkv_hook_names(model, layer)
        q, k = cache[qn], cache[kn].repeat_interleave(model.cfg.n_heads // cache[kn].shape[2], dim=2)
        got = torch.einsum("bthd,bjhd->bhtj", q, k) / math.sqrt(scalar)
        want = cache[f"blocks.{layer}.attn.hook_attn_scores"]
        assert (got - want)[..., causal].abs().max() <= 1e-4 * want[..., causal].abs().max()


def check_eap_with_frozen_scales(model, data, edges, atol: float = 0.0):
    """EAP equals the jvp with every post-norm scale replaced by its clean value (a constant); the
    jvp through the unfrozen model differs, so the convention is what the check pins down."""
    hooks = frozen_scale_hooks(post_norm_scales(model, data.batch()))
    check_eap_matches_jvp(model, data, edges, atol=atol, hooks=hooks)


def check_peap_identities(model, data, checks, floor: float = 1e-4):
    """PEAP's spans sum to EAP; crossing scores (layer, head, kind, key position, query position)
    from `checks(n_positions)` equal the naive recomputation to 1e-5 relative, or 1e-5 * `floor`
    absolute for scores smaller than `floor`."""
    eap = attribute(model, data, "eap", progress=False)
    peap = attribute(model, data, "peap", progress=False)
    assert torch.allclose(peap.values.sum(0), eap.values, atol=1e-5, rtol=1e-4)
    batch = data.batch([0])
    scores = crossing_scores(model, batch, data.metric)
    whole_row = crossing_scores(model, batch, data.metric, query_edges="whole_row")
    n = batch.clean.shape[1]
    checked = []
    for layer, head, kind, t_key, t in checks(n):
        got = crossing_value(scores, whole_row, kind, layer, head, t_key, t)
        want = naive_crossing(model, batch, data.metric, layer, head, kind, t_key, t)
        assert abs(got - want) <= 1e-5 * max(abs(want), floor), (layer, head, kind, t_key, t, got, want)
        checked.append(abs(want))
    assert max(checked) > 1e-2  # some checked edge carries a real effect


# --------------------------------------------------------------------------------------------------
# Tiny random Gemma-3
# --------------------------------------------------------------------------------------------------


def test_tiny_gemma_has_post_norms_and_the_same_graph(tiny_gemma):
    from mechscope.attribution.post_norm import has_post_norms

    assert has_post_norms(tiny_gemma)
    g = Graph.from_model(tiny_gemma)
    assert (g.n_layers, g.n_heads, g.n_kv_heads) == (3, 4, 2)


def test_head_writes_sum_to_attention_output(tiny_gemma, data):
    check_head_writes_sum_to_attention_output(tiny_gemma, data)


def test_attention_hooks_reproduce_scores(tiny_gemma, data):
    check_attention_hooks_reproduce_scores(tiny_gemma, data)


def test_full_circuit_is_the_model_and_empty_circuit_the_counterfactual_run(tiny_gemma, data):
    check_full_and_empty_circuits(tiny_gemma, data, empty_tol=lambda cf: 1e-4, min_gap=0.1)


def test_logits_from_the_final_residual_match_the_model(tiny_gemma, data):
    check_final_residual_logits(tiny_gemma, data)


def test_eap_equals_jvp_with_frozen_post_norm_scales(tiny_gemma, data):
    sub = data[:4]
    edges = lambda s: random.Random(1).sample(range(s.graph.n_edges), 6) + [int(s.values.abs().argmax())]  # noqa: E731
    check_eap_with_frozen_scales(tiny_gemma, sub, edges)
    # Without freezing, the derivative of an edge into layer 0 (its effect passes post norms) is a
    # different number: the convention matters, and the check above holds EAP to the frozen one.
    eap = attribute(tiny_gemma, sub, "eap", progress=False)
    g = eap.graph
    early = g.downstream_read_step[g.edge_down] == 0
    e = int(torch.where(early, eap.values.abs(), torch.zeros_like(eap.values)).argmax())
    check_eap_with_frozen_scales(tiny_gemma, sub, lambda s: [e])
    unfrozen = jvp_edge_derivatives(tiny_gemma, sub, [e])[e]
    assert abs(unfrozen - float(eap.values[e])) > 1e-3 * abs(unfrozen)


def test_peap_spans_sum_to_eap_and_crossing_scores_equal_naive(tiny_gemma, data):
    checks = lambda n: [  # noqa: E731
        (layer, head, kind, t_key, t)
        for layer in range(3)
        for head in (0, 3)
        for kind, t_key, t in CROSSING_CASES(n)
    ]
    check_peap_identities(tiny_gemma, data, checks)


def test_attribution_crossing_scores_match_stand_alone(tiny_gemma, data):
    # dM/dz from the EAP passes goes through the frozen post-norm weight and scale (head_output_grads).
    check_attribution_crossing_matches_stand_alone(tiny_gemma, data)


def test_span_circuit_identities(tiny_gemma, data):
    """Span circuits (crossing edges recomputed inside attention): the full one is the model, the
    empty one the all-ablated run."""
    from mechscope.circuits.circuit import Circuit
    from mechscope.circuits.evaluation import _Evaluator
    from mechscope.circuits.span_circuit import SpanCircuit, SpanGraphScores

    peap = attribute(tiny_gemma, data, "peap", progress=False)
    g, logit_spans = peap.graph, SpanGraphScores(peap).logit_spans
    full = SpanCircuit.full(g, data.schema.spans, logit_spans)
    empty = SpanCircuit.empty(g, data.schema.spans, logit_spans)
    r_full, r_empty, r_dense_empty = _Evaluator(tiny_gemma, data, "counterfactual", None, 4, shortcuts=False).run(
        [full, empty, Circuit.empty(g)], progress=False)
    assert r_full.metric_circuit == pytest.approx(r_full.metric_model, abs=1e-5)
    assert r_empty.metric_circuit == pytest.approx(r_full.metric_empty, abs=1e-5)
    assert r_empty.metric_circuit == pytest.approx(r_dense_empty.metric_circuit, abs=1e-6)
    assert abs(r_full.metric_model - r_full.metric_empty) > 1e-3  # not vacuous


def test_sliding_window_prompts_must_fit_the_window(tiny_gemma):
    check_supported(tiny_gemma, 64)  # the tiny model's window
    with pytest.raises(NotImplementedError, match="sliding window is 64"):
        check_supported(tiny_gemma, 65)


# --------------------------------------------------------------------------------------------------
# The packaged Gemma-3-270M (slow)
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma_ioi(gemma3):
    from mechscope.tasks import make_task

    return make_task("ioi", gemma3.tokenizer, 4, seed=0)


@pytest.mark.slow
def test_gemma3_head_writes_and_attention_hooks(gemma3, gemma_ioi):
    check_head_writes_sum_to_attention_output(gemma3, gemma_ioi[:2])
    check_attention_hooks_reproduce_scores(gemma3, gemma_ioi)


@pytest.mark.slow
def test_gemma3_full_and_empty_circuits(gemma3, gemma_ioi):
    check_full_and_empty_circuits(gemma3, gemma_ioi, empty_tol=lambda cf: 1e-3 * cf.abs().max(), min_gap=1.0)


@pytest.mark.slow
def test_gemma3_eap_equals_jvp(gemma3, gemma_ioi):
    check_eap_with_frozen_scales(
        gemma3, gemma_ioi[:1], lambda s: (int(s.values.abs().argmax()), s.graph.n_edges // 3), atol=1e-6
    )


@pytest.mark.slow
def test_gemma3_peap_identities(gemma3, gemma_ioi):
    # A global layer (5: full attention) and a local one (13); keys and values at the first position
    # where the counterfactual prompt differs (earlier ones are the same tokens: zero scores).
    data = gemma_ioi[:2]
    b = data.batch([0])
    t_diff = int((b.clean[0] != b.counterfactual[0]).nonzero()[0])
    checks = lambda n: [(layer, head, kind, t_key, n - 1) for layer in (5, 13) for head in (0, 2)  # noqa: E731
                        for kind, t_key in (("k", t_diff), ("v", t_diff), ("q", t_diff), ("q", 0),
                                            ("q_row", None))]
    # float32 gradients through 18 layers: about 1e-8 absolute error (scores reach ~3), so scores
    # below 1e-3 are held to 1e-8 absolute rather than 1e-5 relative.
    check_peap_identities(gemma3, data, checks, floor=1e-3)
