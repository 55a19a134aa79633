"""PEAP span aggregations `avg` and `max_abs` (docs/method.md §4) against a token-level brute force on
a dataset whose span lengths vary between examples, and threshold selection of span circuits."""

from __future__ import annotations

import random

import pytest
import tiny
import torch

import mechscope
from mechscope.attribution import attribute
from mechscope.attribution.eap import batch_gradients_and_deltas
from mechscope.data import PromptPairDataset, make_pair, schema_for, single_token, tokenizer_fingerprint
from mechscope.errors import ParameterError


def varied_lengths(tokenizer, n: int, seed: int = 0) -> PromptPairDataset:
    """IOI-shaped pairs whose spans vary in length between examples: `io` holds one or two names,
    `extra` is empty or up to three words, and `end` is empty in some examples (their last token, where
    the logits read, then lies in `s2`)."""
    names = [x for x in tiny.NAMES if single_token(tokenizer, " " + x) is not None]
    rng = random.Random(seed)

    def segs(io, s1, s2, place, extra, end):
        return [("intro", "When"), ("io", io), ("and", " and"), ("s1", " " + s1), ("extra", extra),
                ("rest", f" went to the {place},"), ("s2", " " + s2), ("end", end)]

    examples = []
    for i in range(n):
        a, b, c, d, e, f, h = rng.sample(names, 7)
        place = rng.choice(tiny.PLACES)
        two = i % 2 == 1
        extra = " the" * (i % 4)
        end = "" if i % 3 == 2 else " gave a drink to"
        clean = segs(f" {a} and {f}" if two else f" {a}", b, b, place, extra, end)
        cf = segs(f" {c} and {h}" if two else f" {c}", d, e, place, extra, end)
        examples.append(make_pair(tokenizer, clean, cf, [" " + a], [" " + b]))
    return PromptPairDataset(examples, schema_for(segs("a", "b", "c", "x", "", "")), task="ioi",
                             metric="logit_diff", tokenizer=tokenizer_fingerprint(tokenizer),
                             pad_token_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def varied(tiny_tokenizer):
    data = varied_lengths(tiny_tokenizer, 7)
    lengths = {tuple(b - a for a, b in ex.span_bounds()) for ex in data.examples}
    assert len(lengths) > 3  # the spans' lengths do vary
    return data


def token_instances(model, data, query_edges="per_key"):
    """Every token-level instance of every span edge, per example, by a loop over tokens and pairs:
    within[(example, span)] -> list of [n_edges] scores (NaN for the logits edge away from the last
    token: it is no instance there); crossing[(kind, example, *spans)] -> list of [L, H] scores
    (a per-key query edge has one per pair (t', t) like k and v, a whole-row one one per token t)."""
    g = mechscope.Graph.from_model(model)
    delta, grad, cross = batch_gradients_and_deltas(model, g, data.batch(), data.metric, "eap", crossing=True,
                                                    query_edges=query_edges)
    pair_kinds = ("k", "v", "q") if query_edges == "per_key" else ("k", "v")
    within, crossing = {}, {}
    for b, ex in enumerate(data.examples):
        span = ex.span_of_positions()
        for t in range(len(ex)):
            prod = ((delta[:, b, t] @ grad[:, b, t].T) * g.edge_mask).double()
            if t != len(ex) - 1:
                prod[:, g.logits_index] = float("nan")
            within.setdefault((b, span[t]), []).append(prod[g.edge_up, g.edge_down])
            if query_edges == "whole_row":
                crossing.setdefault(("q", b, span[t]), []).append(cross["q"][b, :, :, t].double())
            for j in range(t + 1):
                for kind in pair_kinds:
                    crossing.setdefault((kind, b, span[j], span[t]), []).append(cross[kind][b, :, :, t, j].double())
    return g, within, crossing


def per_example_then_mean(per_example: list[torch.Tensor]) -> torch.Tensor:
    """The mean over examples of their values, leaving out NaN (an example without an instance);
    0 where no example has one."""
    total = torch.zeros_like(per_example[0])
    count = torch.zeros_like(per_example[0])
    for value in per_example:
        have = ~value.isnan()
        total += torch.where(have, value, 0.0)
        count += have.double()
    return torch.where(count > 0, total / count.clamp(min=1), 0.0)


def example_value(instances: list[torch.Tensor], how: str) -> torch.Tensor:
    """One example's value of a span edge from its instances (NaN entries are not instances)."""
    stack = torch.stack(instances)
    have = ~stack.isnan()
    n = have.sum(0)
    if how == "avg":
        value = torch.where(have, stack, 0.0).sum(0) / n.clamp(min=1)
    else:
        value = torch.where(have, stack.abs(), -1.0).amax(0)
    return torch.where(n > 0, value, float("nan"))


def brute_force(model, data, how: str, query_edges: str = "per_key"):
    g, within, crossing = token_instances(model, data, query_edges)
    pair_kinds = ("k", "v", "q") if query_edges == "per_key" else ("k", "v")
    n_spans, N = len(data.schema), len(data)
    nan_within = torch.full((g.n_edges,), float("nan"), dtype=torch.float64)
    want_within = torch.stack([
        per_example_then_mean([example_value(within[(b, s)], how) if (b, s) in within else nan_within
                               for b in range(N)])
        for s in range(n_spans)])
    L, H = model.cfg.n_layers, model.cfg.n_heads
    nan_head = torch.full((L, H), float("nan"), dtype=torch.float64)
    want_crossing = {kind: torch.zeros(L, H, n_spans, n_spans, dtype=torch.float64) for kind in pair_kinds}
    if query_edges == "whole_row":
        want_crossing["q"] = torch.zeros(L, H, n_spans, dtype=torch.float64)
    for s in range(n_spans):
        if query_edges == "whole_row":
            want_crossing["q"][:, :, s] = per_example_then_mean(
                [example_value(crossing[("q", b, s)], how) if ("q", b, s) in crossing else nan_head for b in range(N)])
        for a in range(s + 1):
            for kind in pair_kinds:
                key = (kind, a, s)
                want_crossing[kind][:, :, a, s] = per_example_then_mean(
                    [example_value(crossing[(kind, b, a, s)], how) if (kind, b, a, s) in crossing else nan_head
                     for b in range(N)])
    return want_within, want_crossing


def close(got: torch.Tensor, want: torch.Tensor, what) -> None:
    """Equal to 1e-5 relative to the largest |value| (float32 scores of float64 sums); exactly 0
    where every wanted value is 0."""
    scale = float(want.abs().max())
    err = float((got.double() - want).abs().max())
    assert err <= 1e-5 * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


@pytest.mark.parametrize("how,query_edges", [("avg", "per_key"), ("max_abs", "per_key"), ("avg", "whole_row"),
                                              ("max_abs", "whole_row")])
def test_per_example_aggregations_match_token_level_brute_force(tiny_model, varied, how, query_edges):
    want_within, want_crossing = brute_force(tiny_model, varied, how, query_edges)
    # batches of 3 over 7 examples: the per-example means and counts must carry across batches
    got = attribute(tiny_model, varied, "peap", aggregation=how, batch_size=3, progress=False,
                    query_edges=query_edges)
    assert got.info == {"aggregation": how, "query_edges": query_edges}
    assert got.query_edges == query_edges and got.crossing["q"].shape == want_crossing["q"].shape
    # the rest of the scores is that of any peap aggregation
    assert got.spans == varied.schema.spans and got.values.dtype == torch.float32
    assert set(got.concrete) == {"within", "crossing", "last"}
    assert all(v.dtype == torch.float32 for v in got.crossing.values())
    for s, name in enumerate(varied.schema.spans):
        close(got.values[s], want_within[s], (how, name))
    for kind in ("k", "v", "q"):
        assert want_crossing[kind].abs().max() > 0
        close(got.crossing[kind], want_crossing[kind], (how, kind))
    # the spans that vary in length, and s2 (which holds the last token in some examples), are non-trivial
    for name in ("io", "extra", "s2"):
        assert want_within[varied.schema.index(name)].abs().max() > 0
    if how == "max_abs":
        assert (got.values >= 0).all() and all((v >= 0).all() for v in got.crossing.values())


def test_avg_differs_from_pooled_mean_where_lengths_vary(tiny_model, varied):
    """Per span: where the span's length is the same in every example that has it, `avg` and
    `pooled_mean` agree; where it varies (`io`: 1 or 3 tokens, `extra`: 0 to 3) they differ (measured:
    25% to 52% of the span's largest |score| on the tiny models)."""
    avg = attribute(tiny_model, varied, "peap", aggregation="avg", batch_size=4, progress=False)
    pooled = attribute(tiny_model, varied, "peap", aggregation="pooled_mean", batch_size=4, progress=False)
    for s, name in enumerate(varied.schema.spans):
        lengths = {b - a for a, b in (ex.span_bounds()[s] for ex in varied.examples)} - {0}
        gap = float((avg.values[s] - pooled.values[s]).abs().max() / pooled.values[s].abs().max().clamp(min=1e-30))
        if len(lengths) == 1:
            assert gap < 1e-5, (name, gap)
        else:
            assert name in ("io", "extra") and gap > 0.1, (name, gap)


def test_aggregation_names(tiny_model, varied):
    with pytest.raises(ParameterError, match="choose one of sum, avg, max_abs, pooled_mean, signed_max"):
        attribute(tiny_model, varied, "peap", aggregation="median", progress=False)
    for old, new in (("mean", "pooled_mean"), ("max", "signed_max")):
        with pytest.raises(ParameterError, match=f"aggregation '{old}' is now called '{new}'"):
            attribute(tiny_model, varied, "peap", aggregation=old, progress=False)
    with pytest.raises(ParameterError, match="peap's span-level scores only"):
        attribute(tiny_model, varied, "eap", aggregation="avg", progress=False)


def test_sum_is_unchanged_by_the_per_example_path(tiny_model, varied):
    """`sum` still sums to EAP over spans on prompts of varying span lengths."""
    eap = attribute(tiny_model, varied, "eap", batch_size=3, progress=False)
    peap = attribute(tiny_model, varied, "peap", batch_size=3, progress=False)
    assert torch.allclose(peap.values.sum(0), eap.values, atol=1e-5, rtol=1e-4)


def test_span_threshold_keeps_exactly_the_edges_at_or_above_it(tiny_model, varied):
    from mechscope.circuits.span_circuit import SpanGraphScores, prune_span_circuit

    scores = attribute(tiny_model, varied, "peap", aggregation="avg", batch_size=4, progress=False)
    every = torch.cat([scores.values.flatten()] + [v.flatten() for v in scores.crossing.values()]).abs()
    tau = float(every[every > 0].double().quantile(0.8))
    raw = scores.threshold(tau, prune=False)
    assert raw.info["selection"] == "threshold" and raw.info["threshold"] == tau
    assert torch.equal(raw.within, scores.values.abs() >= tau)
    for kind in ("k", "v", "q"):
        assert torch.equal(raw.crossing[kind], scores.crossing[kind].abs() >= tau), kind
    assert 0 < int(raw.within.sum()) < raw.within.numel()
    pruned = scores.threshold(tau)
    again = prune_span_circuit(raw)
    assert torch.equal(pruned.within, again.within)
    assert all(torch.equal(pruned.crossing[k], again.crossing[k]) for k in ("k", "v", "q"))
    # 0 keeps every edge of the span graph
    full = scores.threshold(0.0, prune=False)
    kept = int(full.within.sum()) + sum(int(v.sum()) for v in full.crossing.values())
    assert kept == SpanGraphScores(scores).n_edges


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "high", True])
def test_threshold_must_be_a_finite_non_negative_number(tiny_model, varied, bad):
    for method in ("peap", "eap"):
        scores = attribute(tiny_model, varied, method, batch_size=4, progress=False)
        with pytest.raises(ParameterError, match="threshold must be a finite number >= 0"):
            scores.threshold(bad)
