"""PEAP (docs/method.md §3-§4): within-position scores per span and exact crossing-edge scores."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_attribution import ioi_like

import mechscope
from mechscope.attribution import attribute
from mechscope.attribution.attention import attention_scale, qkv_hook_names, score_soft_cap
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
    kind "q": the query at t in its score against the key at t_key only (per-key query edge); "q_row":
    the query at t in every score of row t (whole-row query edge; t_key unused).
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
    scale, cap = attention_scale(model), score_soft_cap(model)
    post = f"blocks.{layer}.ln1_post.hook_scale"
    if post in scales:
        norm = model.blocks[layer].ln1_post
        weight = (1.0 + norm.weight) if norm.uses_weight_offset else norm.weight
        w_o = w_o * weight.double() / float(scales[post][0, t, 0])

    def logit(q_t, key):
        x = q_t @ key * scale
        return cap * torch.tanh(x / cap) if cap is not None else x

    def head_output(q_t, keys, values, q_key=None):
        """q_key: the query used against key t_key alone (default q_t)."""
        logits_row = torch.stack([logit(q_key if q_key is not None and j == t_key else q_t, keys[j])
                                  for j in range(t + 1)])
        weights = logits_row.softmax(0)
        return sum(weights[j] * values[j] for j in range(t + 1)) @ w_o

    before = head_output(q[t], k, v)
    if kind == "q_row":
        after = head_output(q2[t], k, v)
    elif kind == "q":
        after = head_output(q[t], k, v, q_key=q2[t])
    else:
        keys, values = k.clone(), v.clone()
        (keys if kind == "k" else values)[t_key] = (k2 if kind == "k" else v2)[t_key]
        after = head_output(q[t], keys, values)
    return float(((after - before) @ g_mid[0, t].double()).detach())


# (kind, key position, query position) of the crossing edges checked against the naive loop, for a
# prompt of n tokens: keys, values and per-key queries, the BOS key (0) included, and a whole-row query.
CROSSING_CASES = lambda n: (("k", 2, n - 1), ("v", 0, n - 1), ("k", n - 3, n - 2), ("v", 3, 5),  # noqa: E731
                            ("q", 0, n - 1), ("q", 3, n - 1), ("q", n - 2, n - 2), ("q_row", None, n - 1))


def crossing_value(scores, whole_row, kind, layer, head, t_key, t) -> float:
    """One token-level score: `scores` per-key (crossing_scores' default), `whole_row` whole-row q."""
    if kind == "q_row":
        return float(whole_row["q"][0, layer, head, t])
    return float(scores[kind][0, layer, head, t, t_key])


def test_crossing_scores_equal_naive_head_recomputation(tiny_model, data):
    batch = data.batch([0])  # one example, no padding, so the naive loop needs no mask
    scores = crossing_scores(tiny_model, batch, data.metric)
    whole_row = crossing_scores(tiny_model, batch, data.metric, query_edges="whole_row")
    n = batch.clean.shape[1]
    assert scores["q"].shape == scores["k"].shape and whole_row["q"].shape == scores["k"].shape[:4]
    for kind in ("k", "v"):  # the other kinds do not depend on the query edges' definition
        assert torch.equal(scores[kind], whole_row[kind])
    checked = []
    for layer in range(tiny_model.cfg.n_layers):
        for head in (0, tiny_model.cfg.n_heads - 1):
            # and the key whose per-key query edge at the last position is largest
            top = int(scores["q"][0, layer, head, n - 1].abs().argmax())
            for kind, t_key, t in CROSSING_CASES(n) + (("q", top, n - 1),):
                got = crossing_value(scores, whole_row, kind, layer, head, t_key, t)
                want = naive_crossing(tiny_model, batch, data.metric, layer, head, kind, t_key, t)
                assert abs(got - want) <= 1e-5 * max(abs(want), 1e-4), (layer, head, kind, t_key, t, got, want)
                checked.append((kind, abs(want)))
    assert len(checked) == tiny_model.cfg.n_layers * 2 * 9
    assert max(w for kind, w in checked if kind == "q") > 3e-4  # per-key query edges carry real effects
    # Keys after the query position cannot be seen: those crossing scores are zero.
    for kind in ("k", "v", "q"):
        assert scores[kind][0, :, :, 2, 3:].abs().max() == 0


def test_peap_scores_round_trip(tmp_path, tiny_model, data):
    peap = attribute(tiny_model, data, "peap", progress=False)
    peap.save(tmp_path / "p.safetensors")
    again = mechscope.EdgeScores.load(tmp_path / "p.safetensors")
    assert torch.equal(again.values, peap.values) and again.spans == peap.spans
    for key in ("k", "v", "q"):
        assert torch.equal(again.crossing[key], peap.crossing[key])
    assert again.query_edges == "per_key" and again.info["query_edges"] == "per_key"
    # Whole-row query edges, and a file of format /1 (before per-key edges: no query_edges in its info),
    # load as whole-row scores.
    row = attribute(tiny_model, data, "peap", progress=False, query_edges="whole_row")
    assert torch.equal(mechscope.EdgeScores.load(row.save(tmp_path / "r.safetensors")).crossing["q"], row.crossing["q"])
    row.info.pop("query_edges")
    old = row.metadata() | {"format": "mechscope-edge-scores/1"}
    from safetensors.torch import save_file

    save_file({"values": row.values, **{f"crossing_{k}": v.contiguous() for k, v in row.crossing.items()}},
              str(tmp_path / "old.safetensors"), metadata={"mechscope": __import__("json").dumps(old)})
    loaded = mechscope.EdgeScores.load(tmp_path / "old.safetensors")
    assert loaded.query_edges == "whole_row" and loaded.crossing["q"].shape == row.crossing["k"].shape[:2] + (len(data.schema),)
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
    whole_row = crossing_scores(smollm2, batch, data.metric, query_edges="whole_row")
    n = batch.clean.shape[1]
    # A grouped-query head in a late layer (rotary queries and keys): key, value and per-key query at
    # an early position and at BOS, and the whole-row query.
    for kind, t_key in (("k", 3), ("v", 3), ("q", 3), ("q", 0), ("q", n - 1), ("q_row", None)):
        got = crossing_value(scores, whole_row, kind, 23, 3, t_key, n - 1)
        want = naive_crossing(smollm2, batch, data.metric, 23, 3, kind, t_key, n - 1)
        assert abs(got - want) <= 1e-5 * max(abs(want), 1e-4), (kind, t_key, got, want)


def test_attribution_crossing_scores_reuse_the_eap_passes(tiny_model, data):
    check_attribution_crossing_matches_stand_alone(tiny_model, data)


def check_attribution_crossing_matches_stand_alone(model, data):
    """The crossing scores `attribute` takes from the EAP passes (dM/dz from the downstream
    gradients) equal those of the stand-alone computation, which the naive loop checks above."""
    from mechscope.attribution.peap import aggregate_crossing, batch_span_of

    for query_edges in ("per_key", "whole_row"):
        peap = attribute(model, data, "peap", batch_size=4, progress=False, query_edges=query_edges)
        want = None
        for indices, batch in data.batches(4):
            part = aggregate_crossing(crossing_scores(model, batch, data.metric, query_edges),
                                      batch_span_of(data, indices, batch.clean.shape[1]), len(data.schema))
            want = part if want is None else {k: want[k] + v for k, v in part.items()}
        for key in ("k", "v", "q"):
            expected = (want[key] / len(data)).float()
            assert peap.crossing[key].shape == expected.shape, (query_edges, key)
            assert torch.allclose(peap.crossing[key], expected, atol=1e-6, rtol=1e-4), (query_edges, key)
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
    row = batch_gradients_and_deltas(tiny_model, g, batch, sub.metric, "eap", crossing=True,
                                     query_edges="whole_row")[2]["q"]
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
            cross_inst.setdefault(("q_row", s), []).append(row[b, :, :, t])
            for j in range(t + 1):
                for kind in ("k", "v", "q"):
                    cross_inst.setdefault((kind, span[j], s), []).append(cross[kind][b, :, :, t, j])
    mean = attribute(tiny_model, sub, "peap", aggregation="pooled_mean", batch_size=4, progress=False)
    top = attribute(tiny_model, sub, "peap", aggregation="signed_max", batch_size=4, progress=False)
    mean_row, top_row = (attribute(tiny_model, sub, "peap", aggregation=how, batch_size=4, progress=False,
                                   query_edges="whole_row") for how in ("pooled_mean", "signed_max"))
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
        if key[0] == "q_row":  # whole-row query edges: one instance per token of the query span
            got_mean, got_max = mean_row.crossing["q"][:, :, key[1]], top_row.crossing["q"][:, :, key[1]]
        else:
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
