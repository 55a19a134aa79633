"""Edge attribution: `attribute(model, dataset, method=...)` -> `EdgeScores`.

Methods: `eap`, `eap-ig` (../shared/method.md §3) and `exact` (one patched forward per edge; slow,
for validation on small models or a subset of edges).
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..behaviour import check_compatible
from ..data.dataset import PromptPairDataset
from ..graph import Graph
from .eap import METHODS, batch_gradients_and_deltas, contract
from .peap import aggregate_crossing, batch_span_of, concrete_counts
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
    batch_size: int = 16,
    edges: torch.Tensor | None = None,
    progress: bool = True,
) -> EdgeScores:
    """Score every edge of `model`'s graph on `dataset`.

    steps: interpolation points for eap-ig. ablation: counterfactual | mean | zero; `reference` is the
    set the mean is taken over (default: `dataset`). edges: for `exact`, the edge indices to patch
    (others get NaN); default all edges.
    """
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method '{method}'; choose one of {', '.join(ALL_METHODS)}")
    check_ablation(ablation)
    check_compatible(model, dataset)
    graph = Graph.from_model(model)
    mean = mean_reference(model, graph, reference or dataset, batch_size) if ablation == "mean" else None
    crossing, concrete, spans = {}, {}, ()
    if method == "exact":
        from .patching import exact_scores

        values = exact_scores(model, graph, dataset, edges=edges, ablation=ablation, mean=mean,
                              batch_size=batch_size, progress=progress)
    else:
        positional = method == "peap"
        if positional and ablation != "counterfactual":
            raise ValueError("peap crossing edges are implemented for the counterfactual reference only")
        n_spans = len(dataset.schema) if positional else 1
        total = torch.zeros(n_spans, graph.n_upstream, graph.n_downstream, dtype=torch.float64)
        device = model.cfg.device
        bar = tqdm(total=len(dataset), desc=f"{method} attribution", unit="ex", disable=not progress)
        for indices, batch in dataset.batches(batch_size):
            batch = batch.to(device)
            grad_method = "eap" if positional else method
            out = batch_gradients_and_deltas(model, graph, batch, dataset.metric, grad_method, steps,
                                             ablation, mean, crossing=positional)
            delta, grad = out[:2]
            span_of = batch_span_of(dataset, indices, batch.clean.shape[1]) if positional else None
            total += contract(graph, delta, grad, span_of, n_spans).double().cpu()
            if positional:
                part = aggregate_crossing(out[2], span_of, n_spans)
                crossing = {k: crossing.get(k, 0) + v for k, v in part.items()}
            bar.update(len(batch.last))
        bar.close()
        values = (total[:, graph.edge_up, graph.edge_down] / len(dataset)).float()
        if positional:
            crossing = {k: (v / len(dataset)).float() for k, v in crossing.items()}
            concrete = {k: v.float() for k, v in concrete_counts(dataset, n_spans).items()}
            spans = dataset.schema.spans
        else:
            values = values[0]
    return EdgeScores(
        graph=graph,
        values=values,
        method=method,
        metric=dataset.metric,
        ablation=ablation,
        model=getattr(model, "mechscope_name", ""),
        n_examples=len(dataset),
        info={"steps": steps} if method == "eap-ig" else {},
        spans=spans,
        crossing=crossing,
        concrete=concrete,
    )


__all__ = ["ALL_METHODS", "EdgeScores", "attribute"]
