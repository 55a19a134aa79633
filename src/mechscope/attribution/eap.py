"""Edge attribution patching: EAP and EAP-IG (docs/method.md §3).

    score(u -> v) = sum over positions t of (ref_u[t] - z_u[t]) . dM/d(in_v)[t],  averaged over examples

EAP takes the gradient on the clean run. EAP-IG ("inputs" variant, Hanna et al. 2024) averages the
gradient over `steps` runs whose input embedding is moved along the straight line from the reference
input to the clean input: alpha = k/steps for k = 1..steps (the last point is the clean run).

The contraction over (example, position, d_model) is one matrix product per position group; with a
position-to-span assignment it is kept per span, which is how position-aware scores (PEAP) reuse it.
"""

from __future__ import annotations

import torch

from ..data.dataset import Batch
from ..errors import ParameterError
from ..graph import Graph
from ..metrics import compute_metric
from .peap import crossing_from_runs, head_output_grads
from .references import MeanReference, counterfactual_delta, reference_outputs
from .runner import downstream_grads, graph_hooks, run_to_final_logits, tokens_by_span

METHODS = ("eap", "eap-ig")


def span_runs(row: list[int]):
    """(span, start, end) of each run of equal span ids in one example's row (padding, -1, skipped)."""
    t = 0
    while t < len(row):
        s, e = row[t], t
        while e < len(row) and row[e] == s:
            e += 1
        if s >= 0:
            yield s, t, e
        t = e


def contract(
    graph: Graph,
    delta: torch.Tensor,
    grad: torch.Tensor,
    span_of: torch.Tensor | None = None,
    n_spans: int = 1,
    n_blocks: int = 4,
    gather: bool | None = None,
) -> torch.Tensor:
    """Sum over (batch, pos, d) of delta[u, b, t, :] . grad[v, b, t, :], per span.

    delta: [n_up, batch, pos, d]; grad: [n_down, batch, pos, d]; span_of: [batch, pos] span index of
    each token (-1 for padding) or None for one span over every token. Returns [n_spans, n_up, n_down],
    zero where u -> v is not an edge.

    Downstream nodes are cut into `n_blocks` consecutive blocks, each multiplied only with the upstream
    nodes written before its last reader: close to the triangular half of the full product while
    staying a few large matrix products (many thin ones would re-read delta each time).

    Per span, the tokens are either gathered into one block (`gather`; the default on accelerators,
    where launches are the cost) or taken as one view per (example, span) (the default on the CPU,
    where copies of delta and grad are the cost). Both give the same sums.
    """
    n_up, n_down = delta.shape[0], grad.shape[0]
    out = torch.zeros(n_spans, n_up, n_down, dtype=delta.dtype, device=delta.device)
    if span_of is None:
        parts = [(0, delta.flatten(1), grad.flatten(1))]
    elif gather if gather is not None else delta.device.type != "cpu":
        # One product per (example, span) is thousands of small launches at batch 64 on a GPU; one
        # gather of the tokens sorted by span leaves one product per span.
        order, ranges = tokens_by_span(span_of.to(delta.device), n_spans)
        d_sorted = delta.flatten(1, 2)[:, order]  # [n_up, tokens, d]
        g_sorted = grad.flatten(1, 2)[:, order]
        parts = [(s, d_sorted[:, a:e].reshape(n_up, -1), g_sorted[:, a:e].reshape(n_down, -1)) for s, a, e in ranges]
    else:
        # A span's tokens are contiguous within each example, so delta[:, b, a:e] is a view whose
        # (token, d) block flattens without a copy: one product per (example, span), nothing gathered.
        parts = [(s, delta[:, b, t:e].reshape(n_up, -1), grad[:, b, t:e].reshape(n_down, -1))
                 for b, row in enumerate(span_of.tolist()) for s, t, e in span_runs(row)]
    steps = graph.downstream_read_step.tolist()
    bounds = [round(i * n_down / n_blocks) for i in range(n_blocks + 1)]
    for first, last in zip(bounds[:-1], bounds[1:]):
        if last <= first:
            continue
        n_before = graph.n_upstream_before(steps[last - 1])
        for s, d_flat, g_flat in parts:
            out[s, :n_before, first:last] += d_flat[:n_before] @ g_flat[first:last].T
    return out * graph.edge_mask.to(out.device, out.dtype)


def batch_gradients_and_deltas(
    model,
    graph: Graph,
    batch: Batch,
    metric,  # a metric name or function (metrics.Metric)
    method: str = "eap",
    steps: int = 5,
    ablation: str = "counterfactual",
    mean: MeanReference | None = None,
    crossing: bool = False,
    query_edges: str = "per_key",
):
    """(delta [n_up, b, t, d], grad [n_down, b, t, d]) for one batch; their contraction is the score.

    With `crossing` (EAP, counterfactual reference) the same passes also give PEAP's crossing-edge
    scores: returns (delta, grad, crossing scores as `peap.crossing_scores` gives them, with its
    `query_edges`)."""
    if method not in METHODS:
        raise ParameterError(f"unknown method '{method}'; choose one of {', '.join(METHODS)}")
    fast_delta = ablation == "counterfactual"
    if crossing and (method != "eap" or not fast_delta):
        raise ParameterError("crossing-edge scores come with EAP gradients and the counterfactual reference")
    with torch.enable_grad():
        with graph_hooks(model, graph, record_up=True, record_down=(method == "eap"), split_inputs=False,
                         heads_as_z=fast_delta, stop_at_final=True, capture_attention=crossing) as clean_run:
            clean_final = run_to_final_logits(model, clean_run, batch.clean, batch.attention_mask, batch.last)
            if method == "eap":
                m = compute_metric(metric, clean_final, batch, clean_logits=clean_final.detach())
                grad = downstream_grads(clean_run, m.sum(), model)
        clean_up = clean_run.up
        if fast_delta:
            clean_in = clean_up[0].clone()
            delta = counterfactual_delta(model, graph, batch, clean_run, capture_attention=crossing)
            if crossing:
                delta, cf_attention = delta
            ref_in = clean_in + delta[0]
        else:
            reference = reference_outputs(model, graph, batch, ablation, clean_up, mean)
            delta = reference - clean_up
            clean_in, ref_in = clean_up[0], reference[0]
        # Padding sits after each example's last token and is masked as a key, so (causal or
        # bidirectional attention) it gets exactly zero gradient: it adds nothing to any score and
        # needs no masking here.
        if method == "eap-ig":
            grad = torch.zeros(
                graph.n_downstream, *clean_up.shape[1:], dtype=clean_up.dtype, device=clean_up.device
            )
            target = clean_final.detach()
            for k in range(1, steps + 1):
                alpha = k / steps
                point = ref_in + alpha * (clean_in - ref_in)
                with graph_hooks(model, graph, record_down=True, input_override=lambda _x, p=point: p,
                                 split_inputs=False, stop_at_final=True) as run:
                    logits = run_to_final_logits(model, run, batch.clean, batch.attention_mask, batch.last)
                    m = compute_metric(metric, logits, batch, clean_logits=target)
                    grad += downstream_grads(run, m.sum(), model)
            grad /= steps
    grad = grad.detach()
    if crossing:
        gz = head_output_grads(model, graph, grad, clean_run.inv_scale)
        cross = crossing_from_runs(model, batch.attention_mask, clean_run.attention, cf_attention, clean_run.z, gz,
                                   query_edges)
        return delta, grad, cross
    return delta, grad
