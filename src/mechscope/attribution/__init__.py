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
from .references import check_ablation, mean_reference
from .scores import EdgeScores

ALL_METHODS = METHODS + ("exact",)


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
    if method == "exact":
        from .patching import exact_scores

        values = exact_scores(model, graph, dataset, edges=edges, ablation=ablation, mean=mean,
                              batch_size=batch_size, progress=progress)
    else:
        total = torch.zeros(1, graph.n_upstream, graph.n_downstream, dtype=torch.float64)
        device = model.cfg.device
        bar = tqdm(total=len(dataset), desc=f"{method} attribution", unit="ex", disable=not progress)
        for _, batch in dataset.batches(batch_size):
            batch = batch.to(device)
            delta, grad = batch_gradients_and_deltas(model, graph, batch, dataset.metric, method, steps, ablation, mean)
            total += contract(graph, delta, grad).double().cpu()
            bar.update(len(batch.last))
        bar.close()
        values = (total[0, graph.edge_up, graph.edge_down] / len(dataset)).float()
    return EdgeScores(
        graph=graph,
        values=values,
        method=method,
        metric=dataset.metric,
        ablation=ablation,
        model=getattr(model, "mechscope_name", ""),
        n_examples=len(dataset),
        info={"steps": steps} if method == "eap-ig" else {},
    )


__all__ = ["ALL_METHODS", "EdgeScores", "attribute"]
