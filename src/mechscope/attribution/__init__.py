"""Edge attribution: `attribute(model, dataset, method=...)` -> `EdgeScores`.

Methods: `eap`, `eap-ig` (docs/method.md §3) and `exact` (one patched forward per edge; slow,
for validation on small models or a subset of edges).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..devices import HOST, model_device, batch_size_for
from ..behaviour import check_compatible
from ..errors import ParameterError, check_count, check_finite
from ..data.dataset import PromptPairDataset
from ..graph import Graph
from ..metrics import Metric, metric_name, resolve_metric
from .eap import METHODS, batch_gradients_and_deltas, contract
from .aggregation import PER_EXAMPLE, PerExample, check_aggregation
from .peap import (
    aggregate_crossing,
    batch_span_of,
    concrete_counts,
    check_query_edges,
    crossing_max,
    signed_absmax,
    within_max,
)
from .references import check_ablation, mean_reference
from .scores import EdgeScores

ALL_METHODS = METHODS + ("exact", "peap")


def attribute(
    model,
    dataset: PromptPairDataset,
    method: str = "eap",
    *,
    steps: int = 5,
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int | None = None,
    edges: torch.Tensor | None = None,
    progress: bool = True,
    aggregation: str = "sum",
    metric: Metric | None = None,
    query_edges: str = "per_key",
) -> EdgeScores:
    """Score every edge of `model`'s graph on `dataset`.

    steps: interpolation points for eap-ig. ablation: counterfactual | mean | zero; `reference` is the
    set the mean is taken over (default: `dataset`). edges: for `exact`, the edge indices to patch
    (others get NaN); default all edges. aggregation (peap, docs/method.md §4): how token-level scores
    become span-level ones (attribution/aggregation.py): `sum` over tokens and examples divided by the
    number of examples (the default; sums over spans to EAP); `avg`, per example the mean over its
    instances, then the mean over the examples that have one (the PEAP authors' default); `max_abs`,
    per example the largest |instance|, then the mean over the examples that have one; `pooled_mean`,
    the mean over the instances of all examples pooled (differs from `avg` when span lengths vary:
    longer examples weigh more); `signed_max`, the one instance of largest magnitude, signed. metric: a metric name or a function fn(final logits [batch, vocab],
    batch) -> [batch]; default the dataset's metric. The scores record it by name (`metrics.metric_name`).
    query_edges (peap): `per_key` (default), a query edge per (key, query) pair as in the PEAP paper: the
    counterfactual query in one score of its row (crossing["q"] [layer, head, key span, query span], like
    k and v); `whole_row`, the counterfactual query in every score of its row at once (crossing["q"]
    [layer, head, query span]).
    """
    batch_size = batch_size_for(model, batch_size)
    check_method(method, steps, ablation, query_edges)
    check_aggregation(aggregation, method)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    graph = Graph.from_model(model)
    if edges is not None:
        edges = _edge_indices(edges, graph.n_edges)
    mean = mean_reference(model, graph, reference or dataset, batch_size) if ablation == "mean" else None
    crossing, concrete, spans = {}, {}, ()
    if method == "exact":
        from .patching import exact_scores

        values = exact_scores(model, graph, dataset, edges=edges, ablation=ablation, mean=mean,
                              batch_size=batch_size, progress=progress, metric=metric)
    else:
        positional = method == "peap"
        n_spans = len(dataset.schema) if positional else 1
        total = torch.zeros(n_spans, graph.n_upstream, graph.n_downstream, dtype=torch.float64, device=HOST)
        device = model_device(model)
        per_example = PerExample(aggregation, graph, n_spans) if aggregation in PER_EXAMPLE else None
        # Data-parallel runs (distributed.py): each rank sums its shard, the sums are all-reduced below.
        bar = tqdm(total=distributed.shard_size(len(dataset)), desc=f"{method} attribution", unit="ex",
                   disable=not distributed.progress_enabled(progress))
        with distributed.together():
            total, crossing = _attribute_shard(
                model, graph, dataset, method, steps, ablation, mean, metric, query_edges, aggregation,
                per_example, total, positional, n_spans, batch_size, device, bar)
        bar.close()
        if distributed.active():
            total, crossing = _reduce_shards(total, crossing, per_example, aggregation)
        scale = 1.0 if aggregation == "signed_max" else 1.0 / len(dataset)
        values = total[:, graph.edge_up, graph.edge_down] * scale
        if per_example is not None:
            values, crossing = per_example.result()
        if positional:
            if per_example is None:
                crossing = {k: v * scale for k, v in crossing.items()}
            concrete = {k: v.float() for k, v in concrete_counts(dataset, n_spans).items()}
            spans = dataset.schema.spans
            if aggregation == "pooled_mean":  # sum / n_examples -> sum / instances (instances per example: concrete)
                per_edge = concrete["within"][:, None].expand(-1, graph.n_edges).clone()
                logit_edges = graph.edge_down == graph.logits_index
                per_edge[:, logit_edges] = concrete["last"][:, None]  # the logits read one token
                values = _per_instance(values, per_edge)
                crossing = {kind: _per_instance(x, concrete["crossing"] if x.dim() == 4 else concrete["within"])
                            for kind, x in crossing.items()}
            crossing = {k: v.float() for k, v in crossing.items()}
        values = values.float() if positional else values[0].float()
    hint = ("the metric or the model's activations are not finite on this dataset (a custom metric, a "
            "log of zero, or an overflow in a low-precision dtype)")
    check_finite(values if edges is None else values[..., edges], f"{method} scores on {len(dataset)} examples",
                 hint)
    for name, part in crossing.items():
        check_finite(part, f"{method} crossing-edge scores ({name})", hint)
    return EdgeScores(
        graph=graph,
        values=values,
        method=method,
        metric=metric_name(metric),
        ablation=ablation,
        model=getattr(model, "mechscope_name", ""),
        n_examples=len(dataset),
        info={"steps": steps} if method == "eap-ig" else (
            {"aggregation": aggregation, "query_edges": query_edges} if method == "peap" else {}),
        spans=spans,
        crossing=crossing,
        concrete=concrete,
    )


def _attribute_shard(model, graph, dataset, method, steps, ablation, mean, metric, query_edges, aggregation,
                     per_example, total, positional, n_spans, batch_size, device, bar):
    """Sum the token-level scores of `dataset` (this rank's shard of it) into `total` (and crossing-edge
    scores, or `per_example`'s sums); returns (total, crossing)."""
    crossing = {}
    for indices, batch in distributed.batches(dataset, batch_size):
        batch = batch.to(device)
        grad_method = "eap" if positional else method
        out = batch_gradients_and_deltas(model, graph, batch, metric, grad_method, steps,
                                         ablation, mean, crossing=positional, query_edges=query_edges)
        delta, grad = out[:2]
        span_of = batch_span_of(dataset, indices, batch.clean.shape[1], device) if positional else None
        if per_example is not None:
            per_example.add(delta, grad, out[2], span_of, batch.last)
        elif aggregation == "signed_max":
            total = signed_absmax(total, within_max(graph, delta, grad, span_of, n_spans))
            part = crossing_max(out[2], span_of, n_spans)
            crossing = {k: signed_absmax(crossing[k], v.cpu()) if k in crossing else v.cpu() for k, v in part.items()}
        else:
            total += contract(graph, delta, grad, span_of, n_spans).double().cpu()
            if positional:
                part = aggregate_crossing(out[2], span_of, n_spans)
                crossing = {k: crossing.get(k, 0) + v.cpu() for k, v in part.items()}
        bar.update(len(batch.last))
    return total, crossing


def _reduce_shards(total, crossing, per_example, aggregation):
    """Add up (signed_max: take the largest magnitude of) the ranks' partial sums."""
    if per_example is not None:
        per_example.within = distributed.all_reduce_sum(per_example.within)
        per_example.crossing = {k: distributed.all_reduce_sum(v) for k, v in sorted(per_example.crossing.items())}
        for name in ("n_tokens", "n_last", "n_pairs"):
            setattr(per_example, name, distributed.all_reduce_sum(getattr(per_example, name)))
        return total, crossing
    if aggregation == "signed_max":
        parts = distributed.gather_objects((total, crossing))
        total, crossing = parts[0]
        for t, c in parts[1:]:
            total = signed_absmax(total, t)
            crossing = {k: signed_absmax(crossing[k], c[k]) for k in crossing}
        return total, crossing
    return distributed.all_reduce_sum(total), {k: distributed.all_reduce_sum(v) for k, v in sorted(crossing.items())}


def check_method(method: str, steps: int = 5, ablation: str = "counterfactual", query_edges: str = "per_key") -> None:
    """ParameterError unless `method` is one of ALL_METHODS, `steps` (eap-ig's interpolation points) a
    positive integer, `ablation` one the method implements and `query_edges` one of peap's
    (`peap.QUERY_EDGES`; only peap has query edges of its own); checked before any model work by
    `attribute` and the discovery functions."""
    if method not in ALL_METHODS:
        raise ParameterError(f"unknown method '{method}'; choose one of {', '.join(ALL_METHODS)}")
    check_count("steps", steps)
    check_ablation(ablation)
    if method == "peap" and ablation != "counterfactual":
        raise ParameterError("peap crossing edges are implemented for the counterfactual reference only")
    check_query_edges(query_edges)
    if method != "peap" and query_edges != "per_key":
        raise ParameterError("query_edges applies to peap's crossing edges only")


def _edge_indices(edges, n_edges: int) -> torch.Tensor:
    """`edges` (for `exact`) as a 1-D tensor of edge indices, each in [0, n_edges)."""
    edges = torch.as_tensor(edges, device=HOST).flatten()
    if edges.dtype == torch.bool or edges.is_floating_point() or edges.is_complex():
        raise ParameterError(f"edges must be edge indices (integers), not a tensor of {edges.dtype}")
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= n_edges):
        raise ParameterError(f"edges must be indices in [0, {n_edges}) for this model's graph; got "
                             f"{int(edges.min())}..{int(edges.max())}")
    return edges


def _per_instance(summed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Scores summed over instances and divided by the number of examples, divided by the instances
    per example: the mean over instances (zero where a span pair has none)."""
    count = count.to(summed.dtype)
    return torch.where(count > 0, summed / count.clamp(min=1e-12), torch.zeros_like(summed))


__all__ = ["ALL_METHODS", "EdgeScores", "attribute", "check_method"]
