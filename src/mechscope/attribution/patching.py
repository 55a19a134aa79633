"""Exact edge patching (docs/method.md §3): the change in M when one edge is ablated.

One forward pass per edge and batch, so it is for validating the estimators on small models (or a
subset of edges on a real one) and as a slow baseline. Scores are means over examples of
M(edge ablated) - M(clean), the quantity EAP estimates to first order. In a data-parallel run
(distributed.py) each rank patches every edge on its shard of the examples and the per-edge sums are
all-reduced.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..devices import HOST, model_device, batch_size_for
from ..data.dataset import PromptPairDataset
from ..graph import Graph
from ..metrics import Metric, compute_metric, final_logits
from .references import MeanReference, reference_outputs, upstream_outputs
from .runner import Ablation, graph_hooks


@torch.no_grad()
def exact_scores(
    model,
    graph: Graph,
    dataset: PromptPairDataset,
    edges: torch.Tensor | None = None,
    ablation: str = "counterfactual",
    mean: MeanReference | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    absolute: bool = False,
    metric: Metric | None = None,
) -> torch.Tensor:
    """[n_edges] exact scores; edges not in `edges` are NaN. With `absolute`, the mean over examples
    of |M(edge ablated) - M(clean)|, so effects of opposite sign in different examples do not cancel."""
    batch_size = batch_size_for(model, batch_size)
    metric = dataset.metric if metric is None else metric
    edges = torch.arange(graph.n_edges, device=HOST) if edges is None else torch.as_tensor(edges, device=HOST).flatten()
    total = torch.zeros(len(edges), dtype=torch.float64, device=HOST)
    bar = tqdm(total=len(edges) * distributed.shard_size(len(dataset)), desc="exact patching", unit="edge-ex",
               disable=not distributed.progress_enabled(progress))
    with distributed.together():
        _patch_shard(model, graph, dataset, edges, ablation, mean, batch_size, absolute, metric, total, bar)
    bar.close()
    total = distributed.all_reduce_sum(total)
    out = torch.full((graph.n_edges,), float("nan"), device=HOST)
    out[edges] = (total / len(dataset)).float()
    return out


def _patch_shard(model, graph, dataset, edges, ablation, mean, batch_size, absolute, metric, total, bar) -> None:
    """Add each edge's metric change, summed over this rank's shard of `dataset`, into `total`."""
    device = model_device(model)
    for _, batch in distributed.batches(dataset, batch_size):
        batch = batch.to(device)
        clean_up = upstream_outputs(model, graph, batch.clean, batch.attention_mask)
        clean_final = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)
        base = compute_metric(metric, clean_final, batch, clean_logits=clean_final)
        reference = reference_outputs(model, graph, batch, ablation, clean_up, mean)
        keep = torch.ones(graph.n_upstream, graph.n_downstream, dtype=reference.dtype, device=device)
        for i, e in enumerate(edges.tolist()):
            u, v = int(graph.edge_up[e]), int(graph.edge_down[e])
            keep[u, v] = 0.0
            with graph_hooks(model, graph, ablation=Ablation(keep, reference)):
                patched = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)
            keep[u, v] = 1.0
            m = compute_metric(metric, patched, batch, clean_logits=clean_final)
            change = (m - base).double()
            total[i] += (change.abs() if absolute else change).sum().cpu()
            bar.update(len(batch.last))
