"""Token saliency: how much each input token contributes to the task metric (issue 7; docs/method.md §9).

* `input_x_gradient`: s_t = e_t . dM/de_t, with e_t the token embedding at position t (`hook_embed`)
  and M the dataset's metric on the clean prompt. It is the first-order change of M when e_t is
  scaled from 0 to 1, i.e. the directional derivative of M along e_t (what the tests check by finite
  differences).
* `integrated_gradients`: s_t = (e_t - b_t) . mean_k dM/de_t at b + (k - 1/2)/m (e - b), the midpoint
  Riemann sum of the path integral from a baseline b (the counterfactual prompt's embeddings, the
  default, or zero embeddings); summed over t it approaches M(x) - M(baseline) (completeness). The
  zero baseline sits where a pre-norm model's first norm is discontinuous (norm(a e) = norm(e) for
  every a > 0, but norm(0) = 0), so completeness fails there for models without positional
  embeddings added to the residual (Llama-style); the counterfactual baseline has no such problem and
  gives tokens shared by both prompts zero saliency.

Per-example saliencies are lists of [length] tensors; `aggregate_by_span` averages them per span.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from ..devices import HOST, model_device, batch_size_for
from ..behaviour import check_compatible
from ..data.dataset import PromptPairDataset
from ..errors import ParameterError, check_count
from ..metrics import Metric, compute_metric, final_logits, resolve_metric

METHODS = ("input_x_gradient", "integrated_gradients")
BASELINES = ("zero", "counterfactual")


def token_saliency(
    model,
    dataset: PromptPairDataset,
    method: str = "input_x_gradient",
    *,
    steps: int = 16,
    baseline: str = "counterfactual",
    batch_size: int | None = None,
    progress: bool = True,
    metric: Metric | None = None,
) -> list[torch.Tensor]:
    """Saliency of every token of every example's clean prompt: a list of [len(example)] tensors.
    `metric`: a name or a function fn(logits, batch) -> [batch]; default the dataset's."""
    batch_size = batch_size_for(model, batch_size)
    if method not in METHODS:
        raise ParameterError(f"unknown saliency method '{method}'; choose one of {', '.join(METHODS)}")
    if baseline not in BASELINES:
        raise ParameterError(f"unknown baseline '{baseline}'; choose one of {', '.join(BASELINES)}")
    check_count("steps", steps)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    device = model_device(model)
    out: list[torch.Tensor | None] = [None] * len(dataset)
    bar = tqdm(total=len(dataset), desc=f"saliency ({method})", unit="ex", disable=not progress)
    for indices, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        clean_emb = _embeddings(model, batch.clean, batch.attention_mask)
        if method == "input_x_gradient":
            grad = _metric_grad(model, batch, clean_emb, metric)
            sal = (clean_emb * grad).sum(-1)
        else:
            if baseline == "zero":
                base = torch.zeros_like(clean_emb)
            else:
                base = _embeddings(model, batch.counterfactual, batch.attention_mask)
            total = torch.zeros_like(clean_emb)
            for k in range(steps):
                alpha = (k + 0.5) / steps
                total += _metric_grad(model, batch, base + alpha * (clean_emb - base), metric)
            sal = ((clean_emb - base) * total / steps).sum(-1)
        for row, i in enumerate(indices):
            out[i] = sal[row, : len(dataset.examples[i])].detach().cpu()
        bar.update(len(indices))
    bar.close()
    return out


@torch.no_grad()
def _embeddings(model, tokens, attention_mask) -> torch.Tensor:
    store = {}

    def grab(value, hook):
        store["e"] = value.detach().clone()
        return value

    with model.hooks(fwd_hooks=[("hook_embed", grab)]):
        model(tokens, attention_mask=attention_mask)
    return store["e"]


def _metric_grad(model, batch, embeddings: torch.Tensor, metric: Metric) -> torch.Tensor:
    """dM/de at token embeddings `embeddings` (replacing the model's own), summed over the batch."""
    point = embeddings.detach().requires_grad_(True)
    with torch.enable_grad(), model.hooks(fwd_hooks=[("hook_embed", lambda value, hook: point)]):
        logits = model(batch.clean, attention_mask=batch.attention_mask)
        m = compute_metric(metric, final_logits(logits, batch.last), batch)
        (grad,) = torch.autograd.grad(m.sum(), point)
    return grad


def aggregate_by_span(dataset: PromptPairDataset, saliency: list[torch.Tensor], reduce: str = "mean") -> dict:
    """Mean (or mean absolute, `reduce="abs"`) saliency per span of the schema over all its tokens."""
    n = len(dataset.schema)
    total = torch.zeros(n, dtype=torch.float64, device=HOST)
    count = torch.zeros(n, dtype=torch.float64, device=HOST)
    for ex, s in zip(dataset.examples, saliency):
        values = s.double().cpu().abs() if reduce == "abs" else s.double().cpu()
        spans = torch.tensor(ex.span_of_positions(), device=HOST)
        total.index_add_(0, spans, values)
        count.index_add_(0, spans, torch.ones_like(values))
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return dict(zip(dataset.schema.spans, mean.tolist()))
