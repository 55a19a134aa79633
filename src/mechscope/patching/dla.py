"""Direct logit attribution (docs/method.md §9): the logit difference split into what each node
writes directly to the final residual stream.

At the last position the final residual is the sum of the nodes' writes,

    x = embed (+ position embedding) + sum_heads z_h @ W_O[h] + sum_layers b_O + sum_MLPs mlp_out,

and the logit difference is  norm(x) . u + (b_U[correct] - b_U[wrong]),  u = W_U[:, correct] -
W_U[:, wrong] (means over the answers when there are several, as the logit_diff metric has them).
With the final norm's scale r frozen at its clean value, norm(x) = centre(x) / r (LayerNorm; RMSNorm
does not centre; the norm's weight and bias are folded into W_U and b_U) is linear in x, so

    logit diff = sum_nodes centre(write_node) . u / r  +  (b_U[correct] - b_U[wrong])

exactly. Terms: `input` (the embedding as blocks.0.hook_resid_pre has it: scaled embeddings and
learned positions included), every head `a{l}.h{h}`, every MLP `m{l}`, `b_O` (the attention output
biases of all layers, when the model has them) and `b_U`. With post-sublayer norms (Gemma 2 / 3) a
head's write is taken under the frozen-scale split of attribution/post_norm.py and the MLP's write is
its post-normed output, so the identity stays exact. Models whose final logits are soft-capped are
refused: capping is not linear, so their logit difference has no such split.

Per position: each node's write at position t through the norm scale at t (the split is exact at each
example's last position, where the answer is read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..attribution.runner import StopForward, graph_hooks, unembed
from ..behaviour import check_compatible
from ..data.dataset import Batch, PromptPairDataset
from ..devices import batch_size_for, model_device
from ..errors import ParameterError
from ..graph import Graph
from ..metrics import logit_diff
from .path import load_result, save_result


@dataclass
class DLAResult:
    """Direct logit attribution. Axes: `nodes` (term names), positions, examples.

    per_position [n_examples, n_nodes, n_pos]: each term at each position (NaN past an example's end;
    `b_U` is the same at every position); last [n_examples, n_nodes]: at each example's last position,
    summing over nodes to `logit_diff` [n_examples], the model's own logit difference."""

    nodes: list[str]
    per_position: torch.Tensor
    last: torch.Tensor
    logit_diff: torch.Tensor
    n_layers: int
    n_heads: int
    info: dict = field(default_factory=dict)

    def head_map(self) -> torch.Tensor:
        """[n_layers, n_heads]: each head's term at the last position, mean over examples."""
        first = self.nodes.index("a0.h0")
        idx = [first + l * (self.n_heads + 1) + h for l in range(self.n_layers) for h in range(self.n_heads)]
        return self.last[:, idx].mean(0).view(self.n_layers, self.n_heads)

    def mlp_terms(self) -> torch.Tensor:
        """[n_layers]: each MLP's term at the last position, mean over examples."""
        return self.last[:, [self.nodes.index(f"m{l}") for l in range(self.n_layers)]].mean(0)

    def top(self, k: int = 10) -> list[tuple[str, float]]:
        """The k terms with the largest |mean term| at the last position."""
        mean = self.last.mean(0)
        return [(self.nodes[i], float(mean[i])) for i in mean.abs().argsort(descending=True)[:k].tolist()]

    def save(self, path: str | os.PathLike) -> Path:
        meta = {"kind": "dla", "nodes": self.nodes, "n_layers": self.n_layers, "n_heads": self.n_heads,
                "info": self.info}
        return save_result(path, {"per_position": self.per_position, "last": self.last,
                                  "logit_diff": self.logit_diff}, meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "DLAResult":
        t, m = load_result(path, "dla")
        return cls(m["nodes"], t["per_position"], t["last"], t["logit_diff"], m["n_layers"], m["n_heads"],
                   m.get("info", {}))


def check_dla_supported(model) -> None:
    """ParameterError for models whose logit difference is not a sum of the nodes' writes."""
    cap = getattr(model.cfg, "output_logits_soft_cap", None)
    if cap is not None and cap > 0:
        raise ParameterError(f"direct logit attribution: this model soft-caps its logits (cap {cap}), which is not "
                             "linear, so the logit difference does not split into per-node terms")
    kind = (model.cfg.normalization_type or "").upper()
    if kind and not (kind.startswith("LN") or kind.startswith("RMS")):
        raise ParameterError(f"direct logit attribution: final norm '{model.cfg.normalization_type}' is not supported")


def _answer_direction(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(u [b, d], b_U difference [b]): mean unembedding of the correct answers minus that of the wrong."""
    W_U = model.W_U.detach()  # [d, vocab]
    b_U = getattr(model, "b_U", None)

    def mean_over(ids, mask):
        m = mask.to(W_U.dtype)
        cols = W_U[:, ids.to(W_U.device)]  # [d, b, n]
        vec = (cols * m[None]).sum(-1) / m.sum(-1).clamp(min=1)[None]
        bias = ((b_U.detach()[ids] * m).sum(-1) / m.sum(-1).clamp(min=1)) if b_U is not None else None
        return vec.T, bias

    uc, bc = mean_over(batch.correct, batch.correct_mask)
    uw, bw = mean_over(batch.wrong, batch.wrong_mask)
    bias = (bc - bw) if bc is not None else torch.zeros(uc.shape[0], dtype=W_U.dtype, device=W_U.device)
    return uc - uw, bias


def _attention_bias(model, n_layers: int) -> torch.Tensor | None:
    """Sum of the attention output biases over layers [d_model], or None when the model has none."""
    b_O = getattr(model, "b_O", None)
    if b_O is None or not isinstance(b_O, torch.Tensor):
        return None
    return b_O.detach().reshape(n_layers, -1).sum(0)


@torch.no_grad()
def _dla_batch(model, graph: Graph, batch: Batch):
    """(terms [b, n_terms, t], logit diff of the model's logits [b]) for one batch."""
    with graph_hooks(model, graph, record_up=True, split_inputs=False, stop_at_final=True) as run:
        try:
            model(batch.clean, attention_mask=batch.attention_mask)
        except StopForward:
            pass
    writes = run.up  # [n_up, b, t, d]
    final = run.final_residual.detach()  # [b, t, d]
    b_O = _attention_bias(model, graph.n_layers)
    if b_O is not None:
        writes = torch.cat([writes, b_O.to(writes.dtype).expand(1, *writes.shape[1:3], -1)])
    u, bias_u = _answer_direction(model, batch)
    u = u.to(writes.dtype)
    kind = (model.cfg.normalization_type or "").upper()
    if kind.startswith("LN"):
        # Centring is linear: centre(w) . u = w . centre(u).
        u = u - u.mean(-1, keepdim=True)
        centred = final - final.mean(-1, keepdim=True)
    else:
        centred = final
    if kind:
        inv_r = (centred.pow(2).mean(-1) + float(model.cfg.eps)).rsqrt()  # [b, t], the frozen clean scale
    else:
        inv_r = torch.ones(final.shape[:2], dtype=final.dtype, device=final.device)
    terms = torch.einsum("nbtd,bd->bnt", writes, u) * inv_r[:, None, :]
    terms = torch.cat([terms, bias_u.to(terms.dtype)[:, None, None].expand(-1, 1, terms.shape[2])], dim=1)
    # The logit difference, from the final norm (not frozen) and unembedding of the last positions.
    rows = torch.arange(len(batch.last), device=batch.last.device)
    return terms, logit_diff(unembed(model, final[rows, batch.last]), batch)


def direct_logit_attribution(model, dataset: PromptPairDataset, batch_size: int | None = None,
                             progress: bool = True) -> DLAResult:
    """Direct logit attribution of the logit difference (correct - wrong answers) on the clean prompts
    of `dataset`; see the module docstring. Terms are named as graph.py's nodes, plus `b_O`, `b_U`."""
    check_dla_supported(model)
    check_compatible(model, dataset)
    graph = Graph.from_model(model)
    batch_size = batch_size_for(model, batch_size)
    device = model_device(model)
    names = list(graph.upstream_names)
    if _attention_bias(model, graph.n_layers) is not None:
        names.append("b_O")
    names.append("b_U")
    n_pos = max(len(ex.clean) for ex in dataset.examples)
    per_pos, last, diffs = [], [], []
    bar = tqdm(total=len(dataset), desc="direct logit attribution", unit="ex", disable=not progress)
    for _, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        terms, diff = _dla_batch(model, graph, batch)
        terms = terms.float()
        t = terms.shape[2]
        pad = torch.full((terms.shape[0], terms.shape[1], n_pos), float("nan"), device=terms.device)
        pad[:, :, :t] = torch.where(batch.attention_mask[:, None, :].bool(), terms, float("nan"))
        rows = torch.arange(len(batch.last), device=batch.last.device)
        last.append(terms[rows, :, batch.last].cpu())
        per_pos.append(pad.cpu())
        diffs.append(diff.float().cpu())
        bar.update(len(batch.last))
    bar.close()
    return DLAResult(names, torch.cat(per_pos), torch.cat(last), torch.cat(diffs), graph.n_layers, graph.n_heads,
                     info={"n_examples": len(dataset), "graph": graph.spec(), "positions": n_pos})
