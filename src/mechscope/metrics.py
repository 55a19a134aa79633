"""Task metrics on final-position logits (docs/method.md §1).

Every metric takes `logits` of shape [batch, vocab] (the logits at each example's last token) and the
answer tensors of a `Batch` (padded with masks, so examples may have different numbers of correct and
wrong answers) and returns one value per example, shape [batch]. All are differentiable, so they serve
as the M whose gradient attribution methods use.

Wherever a metric is accepted it may be a name (one of `METRICS`) or a Python function
`fn(logits, batch) -> [batch]` of the same shape contract: a custom metric. Files that record the
metric store a function by its `__name__` (`custom` for a lambda); see `metric_name`.
"""

from __future__ import annotations

from typing import Callable, Union

import torch

from .data.dataset import METRICS, Batch
from .errors import MechscopeError, NonFiniteError

MetricFn = Callable[[torch.Tensor, Batch], torch.Tensor]
Metric = Union[str, MetricFn]


class MetricError(MechscopeError, ValueError):
    """An unknown metric name, or a custom metric that does not return one value per example."""


def final_logits(logits: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[batch, pos, vocab] logits -> [batch, vocab] at each example's last real token."""
    return logits[torch.arange(logits.shape[0], device=logits.device), last.to(logits.device)]


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(values.dtype)
    count = mask.sum(-1)
    return (values * mask).sum(-1) / count.clamp(min=1)


def _gather(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return x.gather(-1, ids.to(x.device))


def logit_diff(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean logit of the correct answers minus mean logit of the wrong ones (0 when there are none).

    With one correct and no wrong answer (induction) this is the correct token's logit.
    """
    correct = _masked_mean(_gather(logits, batch.correct), batch.correct_mask.to(logits.device))
    wrong = _masked_mean(_gather(logits, batch.wrong), batch.wrong_mask.to(logits.device))
    return correct - wrong


def prob_diff(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed probability of the correct answers minus that of the wrong ones (Greater-Than)."""
    probs = logits.float().softmax(-1)
    correct = (_gather(probs, batch.correct) * batch.correct_mask.to(probs.device)).sum(-1)
    wrong = (_gather(probs, batch.wrong) * batch.wrong_mask.to(probs.device)).sum(-1)
    return correct - wrong


def kl(logits: torch.Tensor, clean_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_clean || p): how far this run's next-token distribution is from the clean run's."""
    logp = logits.float().log_softmax(-1)
    logq = clean_logits.float().log_softmax(-1)
    return (logq.exp() * (logq - logp)).sum(-1)


def accuracy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """1.0 where the best correct answer out-scores every wrong answer, else 0.0.

    Without wrong answers, whether the top token of the whole vocabulary is a correct answer.
    """
    neg_inf = torch.finfo(logits.dtype).min
    cmask = batch.correct_mask.to(logits.device)
    wmask = batch.wrong_mask.to(logits.device)
    best_correct = _gather(logits, batch.correct).masked_fill(~cmask, neg_inf).max(-1).values
    best_wrong = _gather(logits, batch.wrong).masked_fill(~wmask, neg_inf).max(-1).values
    has_wrong = wmask.any(-1)
    top1 = top1_accuracy(logits, batch).bool()
    return torch.where(has_wrong, best_correct > best_wrong, top1).to(logits.dtype)


def top1_accuracy(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """1.0 where the argmax over the whole vocabulary is one of the correct answers."""
    top = logits.argmax(-1, keepdim=True)
    hit = (batch.correct.to(logits.device) == top) & batch.correct_mask.to(logits.device)
    return hit.any(-1).to(logits.dtype)


def check_metric_values(values: torch.Tensor, metric: Metric, run: str, dataset, indices) -> None:
    """NonFiniteError unless the metric's values [batch] on `run` ("the clean run", ...) for examples
    `indices` of `dataset` are finite; the message names the first bad example's file and line."""
    bad = (~values.detach().isfinite()).nonzero().flatten().tolist()
    if bad:
        i = indices[bad[0]]
        value = float(values[bad[0]])
        more = f" (and {len(bad) - 1} more of the batch's {len(indices)} examples)" if len(bad) > 1 else ""
        raise NonFiniteError(
            f"{dataset.examples[i].where(i, dataset.origin or 'dataset')}: the metric '{metric_name(metric)}' on "
            f"{run} is {value}{more}; results from it would be meaningless (check a custom metric, the "
            "answers, or the model's dtype)"
        )


def metric_name(metric: Metric) -> str:
    """How a metric is recorded in files: its name, or a custom function's `__name__` (`custom` for a
    lambda or an object without a name)."""
    if isinstance(metric, str):
        return metric
    name = getattr(metric, "__name__", "")
    return name if name and name != "<lambda>" else "custom"


def resolve_metric(metric: Metric | None, dataset) -> Metric:
    """The metric to use: `metric` if given (a name or a function), else the dataset's own."""
    if metric is None:
        return dataset.metric
    if isinstance(metric, str):
        if metric not in METRICS:
            raise MetricError(f"unknown metric '{metric}'; choose one of {', '.join(METRICS)} or pass a function")
        return metric
    if not callable(metric):
        raise MetricError(f"a metric is a name or a function fn(logits, batch) -> [batch], not {type(metric).__name__}")
    return metric


def compute_metric(
    name: Metric, logits: torch.Tensor, batch: Batch, clean_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch by metric name, or call a custom metric `fn(logits, batch)`; `kl` needs the clean
    run's final logits. A custom metric must return one value per example, shape [batch]."""
    if callable(name):
        value = name(logits, batch)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != (logits.shape[0],):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise MetricError(
                f"custom metric '{metric_name(name)}' returned {shape}; it must return one value per "
                f"example, a tensor of shape [{logits.shape[0]}]"
            )
        return value
    if name == "logit_diff":
        return logit_diff(logits, batch)
    if name == "prob_diff":
        return prob_diff(logits, batch)
    if name == "accuracy":
        return accuracy(logits, batch)
    if name == "kl":
        if clean_logits is None:
            raise MetricError("the kl metric needs the clean run's logits")
        return kl(logits, clean_logits)
    raise MetricError(f"unknown metric '{name}'; choose one of {', '.join(METRICS)} or pass a function")
