"""Edge ablation with sparse corrections (`Ablation(sparse=True)`, what evaluation runs) gives the logits of
the dense correction sum_u drop[v, u] (ref_u - z_u), for graph and span circuits of every density, and
every form of the correction (dense, gathered drop weights, gathered complement) is exercised."""

from __future__ import annotations

import pytest
import torch
from test_attribution import ioi_like

from mechscope.attribution.attention import attention_scale, score_soft_cap
from mechscope.attribution.peap import batch_span_of
from mechscope.attribution.references import upstream_and_attention
from mechscope.attribution.runner import Ablation, AttentionAblation, graph_hooks, run_to_final_logits
from mechscope.graph import Graph

DENSITIES = (0.0, 0.01, 0.2, 0.9, 1.0)


@pytest.fixture(scope="module")
def data(tiny_tokenizer):
    return ioi_like(tiny_tokenizer, 6, seed=5)


def _logits(model, graph, batch, ablation):
    with torch.no_grad(), graph_hooks(model, graph, ablation=ablation, attention_mask=batch.attention_mask,
                                      stop_at_final=True) as run:
        logits = run_to_final_logits(model, run, batch.clean, batch.attention_mask, batch.last)
    return logits, run


def _forms(run) -> set[str]:
    return {"dense" if cols is None else "complement" if complement else "drop"
            for per in (run._plans or {}).values() for complement, cols, _ in per}


def test_sparse_graph_ablation_equals_dense(tiny_model, data):
    graph, batch = Graph.from_model(tiny_model), data.batch()
    with torch.no_grad():
        ref, _ = upstream_and_attention(tiny_model, graph, batch.counterfactual, batch.attention_mask)
    gen = torch.Generator().manual_seed(0)
    forms = set()
    for density in DENSITIES:
        keep = (torch.rand(graph.n_upstream, graph.n_downstream, generator=gen) < density).float()
        dense, _ = _logits(tiny_model, graph, batch, Ablation(keep, ref))
        sparse, run = _logits(tiny_model, graph, batch, Ablation(keep, ref, sparse=True))
        assert (sparse - dense).abs().max() <= 1e-5 * max(1.0, float(dense.abs().max())), density
        forms |= _forms(run)
    assert forms == {"dense", "complement", "drop"}  # every form of the correction ran


def test_sparse_span_ablation_equals_dense(tiny_model, data):
    graph = Graph.from_model(tiny_model)
    indices = list(range(len(data)))
    batch = data.batch(indices)
    span_of = batch_span_of(data, indices, batch.clean.shape[1])
    n_spans = len(data.schema.spans)
    with torch.no_grad():
        ref, cf_attn = upstream_and_attention(tiny_model, graph, batch.counterfactual, batch.attention_mask)
    gen = torch.Generator().manual_seed(1)
    b, t = batch.clean.shape
    forms = set()
    for density in DENSITIES:
        keep = (torch.rand(n_spans, graph.n_upstream, graph.n_downstream, generator=gen) < density).float()
        shape = (b, graph.n_heads, t, t)
        kk = {l: (torch.rand(shape, generator=gen) < density).float() for l in range(graph.n_layers)}
        kv = {l: (torch.rand(shape, generator=gen) < density).float() for l in range(graph.n_layers)}
        kq = {l: (torch.rand(shape, generator=gen) < density).float() for l in range(graph.n_layers)}
        att = AttentionAblation(kk, kv, kq, cf_attn, attention_scale(tiny_model), score_soft_cap(tiny_model))
        dense, _ = _logits(tiny_model, graph, batch, Ablation(keep, ref, span_of, att))
        sparse, run = _logits(tiny_model, graph, batch, Ablation(keep, ref, span_of, att, sparse=True))
        assert (sparse - dense).abs().max() <= 1e-5 * max(1.0, float(dense.abs().max())), density
        forms |= _forms(run)
    assert forms == {"dense", "complement", "drop"}
