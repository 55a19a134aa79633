"""Ablation references (../shared/method.md §3): what an ablated edge carries instead of the clean value.

* `counterfactual`: the upstream node's output on the paired counterfactual prompt x';
* `mean`: its mean output over a reference set, per position (averaged over the reference examples
  long enough to have that position; later positions take the mean over all reference tokens);
* `zero`: zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.dataset import Batch, PromptPairDataset
from ..graph import Graph
from .runner import StopForward, graph_hooks

ABLATIONS = ("counterfactual", "mean", "zero")


def check_ablation(name: str) -> str:
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation '{name}'; choose one of {', '.join(ABLATIONS)}")
    return name


@torch.no_grad()
def upstream_outputs(model, graph: Graph, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Upstream node outputs [n_up, batch, pos, d_model] on `tokens` (no gradient)."""
    return _reference_pass(model, graph, tokens, attention_mask, heads_as_z=False).up


@torch.no_grad()
def _reference_pass(model, graph: Graph, tokens, attention_mask, heads_as_z: bool):
    with graph_hooks(model, graph, record_up=True, split_inputs=False, stop_at_final=True,
                     heads_as_z=heads_as_z) as run:
        try:
            model(tokens, attention_mask=attention_mask)
        except StopForward:
            pass
    return run


@torch.no_grad()
def counterfactual_delta(model, graph: Graph, batch: Batch, clean_run) -> torch.Tensor:
    """ref - clean for every upstream node [n_up, batch, pos, d] with the counterfactual reference,
    from a clean run recorded with `heads_as_z`: head rows come from (z' - z) @ W_O, one product per
    layer instead of one per pass."""
    cf_run = _reference_pass(model, graph, batch.counterfactual, batch.attention_mask, heads_as_z=True)
    delta = cf_run.up  # head rows are unwritten in both runs: they are filled from z below
    delta[0] -= clean_run.up[0]
    W_O = model.W_O.detach()
    for layer in range(graph.n_layers):
        dz = cf_run.z[layer] - clean_run.z[layer]
        delta[graph.upstream_slice(layer)] = torch.einsum("bthe,hed->hbtd", dz, W_O[layer].to(dz.dtype))
        mlp = graph.mlp_index(layer)
        delta[mlp] -= clean_run.up[mlp]
    return delta


@dataclass
class MeanReference:
    per_position: torch.Tensor  # [n_up, pos, d_model]
    overall: torch.Tensor  # [n_up, d_model], over all reference tokens

    def rows(self, n_pos: int) -> torch.Tensor:
        """[n_up, n_pos, d_model]: per-position means, the overall mean past the reference length."""
        have = min(n_pos, self.per_position.shape[1])
        extra = self.overall[:, None].expand(-1, n_pos - have, -1)
        return torch.cat([self.per_position[:, :have], extra], dim=1)


@torch.no_grad()
def mean_reference(model, graph: Graph, dataset: PromptPairDataset, batch_size: int = 16) -> MeanReference:
    """Mean upstream outputs over the clean prompts of `dataset`, per position and overall."""
    device = model.cfg.device
    total = count = None
    for _, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        up = upstream_outputs(model, graph, batch.clean, batch.attention_mask).transpose(0, 1)  # [b, u, t, d]
        mask = batch.attention_mask.to(up.dtype)  # [b, t]
        s = (up * mask[:, None, :, None]).sum(0).transpose(0, 1)  # [t, u, d]
        c = mask.sum(0)
        if total is None:
            total, count = s, c
        else:
            width = max(total.shape[0], s.shape[0])
            total = _pad_rows(total, width) + _pad_rows(s, width)
            count = _pad_rows(count, width) + _pad_rows(c, width)
    overall = total.sum(0) / count.sum().clamp(min=1)
    mean = total / count.clamp(min=1)[:, None, None]
    per_position = torch.where(count[:, None, None] > 0, mean, overall).transpose(0, 1).contiguous()
    return MeanReference(per_position, overall)


def _pad_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[0] == width:
        return x
    pad = torch.zeros(width - x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def reference_outputs(
    model, graph: Graph, batch: Batch, ablation: str, clean_up: torch.Tensor, mean: MeanReference | None = None
) -> torch.Tensor:
    """Reference upstream outputs for `batch`, shaped like `clean_up` [n_up, batch, pos, d_model]."""
    if ablation == "counterfactual":
        return upstream_outputs(model, graph, batch.counterfactual, batch.attention_mask)
    if ablation == "zero":
        return torch.zeros_like(clean_up)
    if ablation == "mean":
        if mean is None:
            raise ValueError("mean ablation needs the mean reference (see mean_reference)")
        return mean.rows(clean_up.shape[2])[:, None].expand_as(clean_up).to(clean_up.device)
    raise ValueError(f"unknown ablation '{ablation}'")
