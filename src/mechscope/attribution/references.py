"""Ablation references (docs/method.md §3): what an ablated edge carries instead of the clean value.

* `counterfactual`: the upstream node's output on the paired counterfactual prompt x';
* `mean`: its mean output over a reference set, per position (averaged over the reference examples
  long enough to have that position; later positions take the mean over all reference tokens);
* `zero`: zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import distributed
from ..devices import HOST, model_device, batch_size_for
from ..data.dataset import Batch, PromptPairDataset
from ..errors import ParameterError
from ..graph import Graph
from .post_norm import head_write_weights
from .runner import StopForward, graph_hooks, last_token_logits

ABLATIONS = ("counterfactual", "mean", "zero")


def check_ablation(name: str) -> str:
    if name not in ABLATIONS:
        raise ParameterError(f"unknown ablation '{name}'; choose one of {', '.join(ABLATIONS)}")
    return name


@torch.no_grad()
def upstream_outputs(model, graph: Graph, tokens: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Upstream node outputs [n_up, batch, pos, d_model] on `tokens` (no gradient)."""
    return _reference_pass(model, graph, tokens, attention_mask, heads_as_z=False).up


@torch.no_grad()
def upstream_and_attention(model, graph: Graph, tokens, attention_mask, attention: bool = True) -> tuple[torch.Tensor, dict]:
    """(upstream outputs [n_up, batch, pos, d], per layer (q, k, v)) on `tokens`; with `attention`
    False the second is empty (nothing captured)."""
    run = _reference_pass(model, graph, tokens, attention_mask, heads_as_z=False, capture_attention=attention)
    return run.up, {layer: tuple(t) for layer, t in run.attention.items()}


@torch.no_grad()
def clean_pass(model, graph: Graph, batch: Batch, attention: bool = True) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """`upstream_and_attention` on the batch's clean prompts and, from the same pass, the logits at
    each example's last token [b, vocab]."""
    return _pass_with_logits(model, graph, batch.clean, batch, attention)


@torch.no_grad()
def counterfactual_pass(model, graph: Graph, batch: Batch, attention: bool = True) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """`clean_pass` on the batch's counterfactual prompts (read at the clean prompts' last tokens)."""
    return _pass_with_logits(model, graph, batch.counterfactual, batch, attention)


def _pass_with_logits(model, graph: Graph, tokens, batch: Batch, attention: bool):
    run = _reference_pass(model, graph, tokens, batch.attention_mask, heads_as_z=False, capture_attention=attention)
    attn = {layer: tuple(t) for layer, t in run.attention.items()}
    return run.up, attn, last_token_logits(model, run, batch.last)


@torch.no_grad()
def _reference_pass(model, graph: Graph, tokens, attention_mask, heads_as_z: bool, capture_attention: bool = False):
    with graph_hooks(model, graph, record_up=True, split_inputs=False, stop_at_final=True,
                     heads_as_z=heads_as_z, capture_attention=capture_attention) as run:
        try:
            model(tokens, attention_mask=attention_mask)
        except StopForward:
            pass
    return run


@torch.no_grad()
def counterfactual_delta(model, graph: Graph, batch: Batch, clean_run, capture_attention: bool = False):
    """ref - clean for every upstream node [n_up, batch, pos, d] with the counterfactual reference,
    from a clean run recorded with `heads_as_z`: head rows come from (z' - z) @ W_O, one product per
    layer instead of one per pass. With post-sublayer norms each run's z is first divided by that
    run's own ln1_post scale (post_norm.py): (z' / r' - z / r) @ W_O * w1. With `capture_attention`,
    returns (delta, the counterfactual run's (q, k, v) per layer)."""
    cf_run = _reference_pass(model, graph, batch.counterfactual, batch.attention_mask, heads_as_z=True,
                             capture_attention=capture_attention)
    delta = cf_run.up  # head rows are unwritten in both runs: they are filled from z below
    delta[0] -= clean_run.up[0]
    W = head_write_weights(model)
    for layer in range(graph.n_layers):
        z_cf, z_clean = cf_run.z[layer], clean_run.z[layer]
        if layer in cf_run.inv_scale:
            z_cf, z_clean = z_cf * cf_run.inv_scale[layer], z_clean * clean_run.inv_scale[layer]
        dz = z_cf - z_clean
        delta[graph.upstream_slice(layer)] = torch.einsum("bthe,hed->hbtd", dz, W[layer].to(dz.dtype))
        mlp = graph.mlp_index(layer)
        delta[mlp] -= clean_run.up[mlp]
    return (delta, cf_run.attention) if capture_attention else delta


@dataclass
class MeanReference:
    per_position: torch.Tensor  # [n_up, pos, d_model]
    overall: torch.Tensor  # [n_up, d_model], over all reference tokens
    # Means of each layer's (q, k, v) as the attention hooks give them, flattened over heads:
    # (layer, slot) -> MeanReference of shape [1, pos, heads * d_head]. Filled by `mean_reference`
    # with `attention=True`, for ablating crossing edges.
    attention: dict = None

    def rows(self, n_pos: int) -> torch.Tensor:
        """[n_up, n_pos, d_model]: per-position means, the overall mean past the reference length."""
        have = min(n_pos, self.per_position.shape[1])
        extra = self.overall[:, None].expand(-1, n_pos - have, -1)
        return torch.cat([self.per_position[:, :have], extra], dim=1)


class _PositionMean:
    """Running per-position sums of [n, batch, pos, x] tensors over the real tokens of batches."""

    def __init__(self):
        self.total = self.count = None

    def add(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        s = (x * mask.to(x.dtype)[None, :, :, None]).sum(1).transpose(0, 1)  # [t, n, x]
        c = mask.to(x.dtype).sum(0)
        if self.total is None:
            self.total, self.count = s, c
        else:
            width = max(self.total.shape[0], s.shape[0])
            self.total = _pad_rows(self.total, width) + _pad_rows(s, width)
            self.count = _pad_rows(self.count, width) + _pad_rows(c, width)

    def result(self) -> MeanReference:
        overall = self.total.sum(0) / self.count.sum().clamp(min=1)
        mean = self.total / self.count.clamp(min=1)[:, None, None]
        per_position = torch.where(self.count[:, None, None] > 0, mean, overall).transpose(0, 1).contiguous()
        return MeanReference(per_position, overall)

    def add_ranks(self) -> None:
        """Collective: replace this rank's sums and counts with those of all ranks, padded to the longest
        position any rank saw, so that the mean weighs every token once however the shards differ in size
        or length. The sums travel in float64 and come back in their own dtype."""
        width = int(distributed.all_reduce_max(torch.tensor([self.total.shape[0]], device=HOST)))
        self.total = _rank_sum(_pad_rows(self.total, width))
        self.count = _rank_sum(_pad_rows(self.count, width))


def _rank_sum(x: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_sum(x.double()).to(x.dtype)


@torch.no_grad()
def mean_reference(model, graph: Graph, dataset: PromptPairDataset, batch_size: int | None = None,
                   attention: bool = False) -> MeanReference:
    """Mean upstream outputs over the clean prompts of `dataset`, per position and overall (and, with
    `attention`, the means of every layer's queries, keys and values).

    In a data-parallel run (distributed.py) every rank must call it: each reads its shard of `dataset`
    and the per-position sums and token counts are all-reduced, so every rank gets the whole set's
    means. A set with fewer examples than ranks is read whole on every rank."""
    batch_size = batch_size_for(model, batch_size)
    device = model_device(model)
    up_mean = _PositionMean()
    attn_means: dict[tuple[int, int], _PositionMean] = {}
    sharded = distributed.active() and len(dataset) >= distributed.world_size()
    with distributed.together():
        for _, batch in distributed.batches(dataset, batch_size) if sharded else dataset.batches(batch_size):
            batch = batch.to(device)
            up, attn = upstream_and_attention(model, graph, batch.clean, batch.attention_mask, attention)
            up_mean.add(up, batch.attention_mask)
            for layer, tensors in attn.items():
                for slot, x in enumerate(tensors):
                    attn_means.setdefault((layer, slot), _PositionMean()).add(x.flatten(2)[None], batch.attention_mask)
    if sharded:
        for m in [up_mean, *(attn_means[key] for key in sorted(attn_means))]:
            m.add_ranks()
    out = up_mean.result()
    out.attention = {key: m.result() for key, m in attn_means.items()} if attention else None
    return out


def _pad_rows(x: torch.Tensor, width: int) -> torch.Tensor:
    if x.shape[0] == width:
        return x
    pad = torch.zeros(width - x.shape[0], *x.shape[1:], dtype=x.dtype, device=x.device)
    return torch.cat([x, pad])


def attention_references(model, graph: Graph, batch: Batch, ablation: str, clean_attention: dict,
                         mean: MeanReference | None = None, counterfactual: dict | None = None) -> dict:
    """Reference (q, k, v) per layer for ablating crossing edges, shaped like the clean ones."""
    if ablation == "counterfactual":
        return counterfactual
    out = {}
    for layer, tensors in clean_attention.items():
        refs = []
        for slot, x in enumerate(tensors):
            if ablation == "zero":
                refs.append(torch.zeros_like(x))
                continue
            if mean is None or mean.attention is None:
                raise ValueError("mean ablation of crossing edges needs mean_reference(..., attention=True)")
            rows = mean.attention[(layer, slot)].rows(x.shape[1])[0].to(x.device, x.dtype)  # [t, heads * d]
            refs.append(rows.view(x.shape[1], *x.shape[2:])[None].expand_as(x))
        out[layer] = tuple(refs)
    return out


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
