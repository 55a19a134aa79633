"""PEAP (docs/method.md §3-§4): within-position scores per span and exact crossing-edge scores."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attribution import ioi_like

import mechscope
from mechscope.attribution import attribute
from mechscope.attribution.attention import attention_scale, qkv_hook_names
from mechscope.attribution.peap import crossing_scores
from mechscope.metrics import compute_metric, final_logits


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 6, seed=4)


def test_within_position_scores_sum_to_eap(tiny_model, data):
    eap = attribute(tiny_model, data, "eap", progress=False)
    peap = attribute(tiny_model, data, "peap", progress=False)
    assert peap.values.shape == (len(data.schema), eap.graph.n_edges)
    assert torch.allclose(peap.values.sum(0), eap.values, atol=1e-5, rtol=1e-4)
    assert peap.spans == data.schema.spans


def test_single_span_peap_equals_eap(tiny_model, data):
    one = data.single_span()
    eap = attribute(tiny_model, data, "eap", progress=False)
    peap = attribute(tiny_model, one, "peap", progress=False)
    assert torch.allclose(peap.values[0], eap.values, atol=1e-6, rtol=1e-5)
    # The crossing scores over one span pair are the per-head sums of all token-level ones.
    assert peap.crossing["k"].shape == (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, 1, 1)


def post_norm_scales(model, batch) -> dict[str, torch.Tensor]:
    """The clean run's scales r of every post-sublayer norm (Gemma: ln1_post, ln2_post), by hook name;
    empty for models without them."""
    names = [n for n in model.hook_dict if n.endswith(("ln1_post.hook_scale", "ln2_post.hook_scale"))]
    _, cache = model.run_with_cache(batch.clean, attention_mask=batch.attention_mask, names_filter=names)
    return {n: cache[n].detach().clone() for n in names}


def frozen_scale_hooks(scales: dict[str, torch.Tensor]):
    """Forward hooks that replace each post-norm scale by the stored constant: its derivative is zero,
    its value the clean one (the convention of mechscope.attribution.post_norm)."""
    return [(name, lambda value, hook, c=c: c) for name, c in scales.items()]


def naive_crossing(model, batch, metric, layer, head, kind, t_key, t):
    """Patch one key / value (at t_key) or query (at t) of one head, rerun the head by hand with an
    explicit softmax, and take the change of its write at t times dM/d(resid after attention)[t].
    With post-sublayer norms the write is w1 * (z @ W_O) / r, r ln1_post's scale on the clean run,
    and dM/d(resid) is taken with every post-norm scale held at its clean value."""
    qn, kn, vn = qkv_hook_names(model, layer)
    mid = f"blocks.{layer}.hook_resid_mid"
    scales = post_norm_scales(model, batch)
    store = {}

    def grab(value, hook):
        store[hook.name] = value
        return value

    with warnings.catch_warnings(), model.hooks(fwd_hooks=frozen_scale_hooks(scales) + [(mid, grab)]):
        warnings.simplefilter("ignore")  # the bridge warns that an edited scale leaves its fast path
        logits = model(batch.clean, attention_mask=batch.attention_mask)
    m = compute_metric(metric, final_logits(logits, batch.last), batch).sum()
    g_mid = torch.autograd.grad(m, store[mid])[0].detach()
    # q, k, v from plain runs (an edited scale changes the norm's rounding, not its value).
    _, clean = model.run_with_cache(batch.clean, attention_mask=batch.attention_mask)
    store.update({n: clean[n] for n in (qn, kn, vn)})
    _, cf = model.run_with_cache(batch.counterfactual, attention_mask=batch.attention_mask)
    group = head // (model.cfg.n_heads // store[kn].shape[2])
    q, k, v = (store[n][0, :, i].detach().double() for n, i in ((qn, head), (kn, group), (vn, group)))
    q2, k2, v2 = (cf[n][0, :, i].double() for n, i in ((qn, head), (kn, group), (vn, group)))
    w_o = model.W_O[layer, head].double()
    scale = attention_scale(model)
    post = f"blocks.{layer}.ln1_post.hook_scale"
    if post in scales:
        norm = model.blocks[layer].ln1_post
        weight = (1.0 + norm.weight) if norm.uses_weight_offset else norm.weight
        w_o = w_o * weight.double() / float(scales[post][0, t, 0])

    def head_output(q_t, keys, values):
        logits_row = torch.stack([q_t @ keys[j] * scale for j in range(t + 1)])
        weights = logits_row.softmax(0)
        return sum(weights[j] * values[j] for j in range(t + 1)) @ w_o

    before = head_output(q[t], k, v)
    if kind == "q":
        after = head_output(q2[t], k, v)
    else:
        keys, values = k.clone(), v.clone()
        (keys if kind == "k" else values)[t_key] = (k2 if kind == "k" else v2)[t_key]
        after = head_output(q[t], keys, values)
    return float(((after - before) @ g_mid[0, t].double()).detach())


def test_crossing_scores_equal_naive_head_recomputation(tiny_model, data):
    batch = data.batch([0])  # one example, no padding, so the naive loop needs no mask
    scores = crossing_scores(tiny_model, batch, data.metric)
    n = batch.clean.shape[1]
    checked = 0
    for layer in range(tiny_model.cfg.n_layers):
        for head in (0, tiny_model.cfg.n_heads - 1):
            for kind, t_key, t in (("k", 2, n - 1), ("v", 0, n - 1), ("k", n - 3, n - 2), ("v", 3, 5), ("q", None, n - 1)):
                got = float(scores[kind][0, layer, head, t] if kind == "q" else scores[kind][0, layer, head, t, t_key])
                want = naive_crossing(tiny_model, batch, data.metric, layer, head, kind, t_key, t)
                assert abs(got - want) <= 1e-5 * max(abs(want), 1e-4), (layer, head, kind, t_key, t, got, want)
                checked += 1
    assert checked == tiny_model.cfg.n_layers * 2 * 5
    # Keys after the query position cannot be seen: those crossing scores are zero.
    assert scores["k"][0, :, :, 2, 3:].abs().max() == 0


def test_peap_scores_round_trip(tmp_path, tiny_model, data):
    peap = attribute(tiny_model, data, "peap", progress=False)
    peap.save(tmp_path / "p.safetensors")
    again = mechscope.EdgeScores.load(tmp_path / "p.safetensors")
    assert torch.equal(again.values, peap.values) and again.spans == peap.spans
    for key in ("k", "v", "q"):
        assert torch.equal(again.crossing[key], peap.crossing[key])
    assert torch.equal(again.concrete["within"], peap.concrete["within"])
    # Concrete counts: the mean prompt length is the sum of the within-position counts.
    mean_len = sum(len(ex) for ex in data.examples) / len(data)
    assert float(peap.concrete["within"].sum()) == pytest.approx(mean_len)


@pytest.mark.slow
def test_smollm2_peap_identities(smollm2):
    from mechscope.tasks import make_task

    data = make_task("ioi", smollm2.tokenizer, 2, seed=5)
    eap = attribute(smollm2, data, "eap", progress=False)
    peap = attribute(smollm2, data, "peap", progress=False)
    assert torch.allclose(peap.values.sum(0), eap.values, atol=1e-5, rtol=1e-4)
    batch = data.batch([0])
    scores = crossing_scores(smollm2, batch, data.metric)
    n = batch.clean.shape[1]
    # A grouped-query head in a late layer (rotary keys), key and value at an early position.
    for kind, t_key in (("k", 3), ("v", 3), ("q", None)):
        got = float(scores[kind][0, 23, 3, n - 1] if kind == "q" else scores[kind][0, 23, 3, n - 1, t_key])
        want = naive_crossing(smollm2, batch, data.metric, 23, 3, kind, t_key, n - 1)
        assert abs(got - want) <= 1e-5 * max(abs(want), 1e-4), (kind, got, want)


def test_attribution_crossing_scores_reuse_the_eap_passes(tiny_model, data):
    check_attribution_crossing_matches_stand_alone(tiny_model, data)


def check_attribution_crossing_matches_stand_alone(model, data):
    """The crossing scores `attribute` takes from the EAP passes (dM/dz from the downstream
    gradients) equal those of the stand-alone computation, which the naive loop checks above."""
    from mechscope.attribution.peap import aggregate_crossing, batch_span_of

    peap = attribute(model, data, "peap", batch_size=4, progress=False)
    want = None
    for indices, batch in data.batches(4):
        part = aggregate_crossing(crossing_scores(model, batch, data.metric),
                                  batch_span_of(data, indices, batch.clean.shape[1]), len(data.schema))
        want = part if want is None else {k: want[k] + v for k, v in part.items()}
    for key in ("k", "v", "q"):
        expected = (want[key] / len(data)).float()
        assert torch.allclose(peap.crossing[key], expected, atol=1e-6, rtol=1e-4), key
        assert expected.abs().max() > 1e-4


def test_span_aggregations_match_token_level_brute_force(tiny_model, data):
    """`pooled_mean` and `signed_max` aggregation equal the mean / largest-magnitude token-level
    instance, found by looping over every token (within) and every (t', t) pair (crossing)."""
    from mechscope.attribution.eap import batch_gradients_and_deltas

    sub = data[:4]
    n_spans = len(sub.schema)
    g = mechscope.Graph.from_model(tiny_model)
    batch = sub.batch()
    delta, grad, cross = batch_gradients_and_deltas(tiny_model, g, batch, sub.metric, "eap", crossing=True)
    inst = {s: [] for s in range(n_spans)}
    cross_inst: dict = {}
    for b, ex in enumerate(sub.examples):
        span = ex.span_of_positions()
        for t in range(len(ex)):
            s = span[t]
            prod = (delta[:, b, t] @ grad[:, b, t].T) * g.edge_mask
            if t != len(ex) - 1:
                prod[:, g.logits_index] = float("nan")  # the logits read only the last token
            inst[s].append(prod.double())
            cross_inst.setdefault(("q", s), []).append(cross["q"][b, :, :, t])
            for j in range(t + 1):
                for kind in ("k", "v"):
                    cross_inst.setdefault((kind, span[j], s), []).append(cross[kind][b, :, :, t, j])
    mean = attribute(tiny_model, sub, "peap", aggregation="pooled_mean", batch_size=4, progress=False)
    top = attribute(tiny_model, sub, "peap", aggregation="signed_max", batch_size=4, progress=False)
    for s in range(n_spans):
        stack = torch.stack(inst[s])  # [instances, u, v]
        want_mean = stack.nanmean(0).nan_to_num(0.0)[g.edge_up, g.edge_down]
        filled = stack.nan_to_num(0.0)
        pick = filled.abs().argmax(0, keepdim=True)
        want_max = filled.gather(0, pick)[0][g.edge_up, g.edge_down]
        assert torch.allclose(mean.values[s].double(), want_mean, atol=1e-6, rtol=1e-4), s
        assert torch.allclose(top.values[s].double(), want_max, atol=1e-6, rtol=1e-4), s
    for key, items in cross_inst.items():
        stack = torch.stack(items)
        want_max = stack.gather(0, stack.abs().argmax(0, keepdim=True))[0]
        got_mean = mean.crossing[key[0]][(slice(None), slice(None), *key[1:])]
        got_max = top.crossing[key[0]][(slice(None), slice(None), *key[1:])]
        assert torch.allclose(got_mean.double(), stack.mean(0), atol=1e-6, rtol=1e-4), key
        assert torch.allclose(got_max.double(), want_max, atol=1e-6, rtol=1e-4), key
    with pytest.raises(ValueError, match="aggregation"):
        attribute(tiny_model, sub, "eap", aggregation="signed_max", progress=False)


def test_span_contraction_by_gather_equals_the_per_example_views(tiny_model, data):
    # The GPU default (tokens gathered per span) and the CPU default (one view per example and span)
    # must give the same span sums; both run here on the CPU.
    from mechscope.attribution.eap import batch_gradients_and_deltas, contract
    from mechscope.attribution.peap import batch_span_of
    from mechscope.graph import Graph

    graph = Graph.from_model(tiny_model)
    indices = list(range(len(data)))
    batch = data.batch(indices)
    delta, grad = batch_gradients_and_deltas(tiny_model, graph, batch, data.metric)
    span_of = batch_span_of(data, indices, batch.clean.shape[1])
    n = len(data.schema)
    views = contract(graph, delta, grad, span_of, n, gather=False)
    gathered = contract(graph, delta, grad, span_of, n, gather=True)
    assert views.abs().sum() > 0
    torch.testing.assert_close(gathered, views, rtol=1e-5, atol=1e-6)
