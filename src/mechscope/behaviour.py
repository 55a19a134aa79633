"""How a model behaves on a dataset: per-example metric on clean and counterfactual prompts, accuracy,
a summary, and the filter that keeps the examples the model gets right.

Reported before any circuit work so a reader can see whether there is behaviour to explain
(docs/method.md §6).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .attribution.runner import graph_hooks, run_to_final_logits
from .devices import model_device, batch_size_for
from .graph import Graph
from .data.dataset import DatasetError, PromptPairDataset, tokenizer_fingerprint
from .metrics import (
    Metric,
    accuracy,
    check_metric_values,
    compute_metric,
    metric_name,
    resolve_metric,
    top1_accuracy,
)


def check_compatible(model, dataset: PromptPairDataset, source: str = "dataset") -> None:
    """Raise DatasetError unless `dataset` was tokenized for `model` and fits its context and
    vocabulary. Errors name the dataset's file (and the example's line) when it was read from one."""
    source = dataset.origin or source
    if len(dataset) == 0:
        raise DatasetError(f"{source}: the dataset has no examples")
    if dataset.tokenizer and dataset.tokenizer != tokenizer_fingerprint(model.tokenizer):
        raise DatasetError(
            f"{source}: tokenized for another tokenizer (made for model '{dataset.model or '?'}'); "
            "regenerate or convert it with this model"
        )
    dataset.validate(n_ctx=model.cfg.n_ctx, source=source)
    vocab_in = model.cfg.d_vocab
    vocab_out = getattr(model.cfg, "d_vocab_out", -1)
    vocab_out = vocab_out if vocab_out and vocab_out > 0 else vocab_in  # answers index the output vocabulary
    if dataset.pad_token_id >= vocab_in:
        raise DatasetError(f"{source}: pad_token_id {dataset.pad_token_id} >= the model's vocabulary size {vocab_in}")
    for i, ex in enumerate(dataset.examples):
        for name in ("clean", "counterfactual", "correct", "wrong"):
            ids = getattr(ex, name)
            vocab = vocab_in if name in ("clean", "counterfactual") else vocab_out
            if ids and max(ids) >= vocab:
                raise DatasetError(f"{ex.where(i, source)}: field '{name}': token id {max(ids)} >= the model's "
                                   f"vocabulary size {vocab}")


@dataclass
class Behaviour:
    """Per-example results, each a tensor of shape [n_examples]."""

    metric_clean: torch.Tensor
    metric_counterfactual: torch.Tensor
    correct: torch.Tensor  # accuracy on the clean prompt (best correct answer beats every wrong one)
    top1: torch.Tensor  # argmax of the clean run is a correct answer

    def summary(self, metric: Metric) -> dict:
        return {
            "n_examples": int(self.correct.numel()),
            "metric": metric_name(metric),
            "model_accuracy": float(self.correct.float().mean()),
            "top1_accuracy": float(self.top1.float().mean()),
            "metric_clean": float(self.metric_clean.mean()),
            "metric_counterfactual": float(self.metric_counterfactual.mean()),
        }


@torch.no_grad()
def measure_behaviour(model, dataset: PromptPairDataset, batch_size: int | None = None, progress: bool = True,
                      metric: Metric | None = None) -> Behaviour:
    """Run clean and counterfactual prompts through `model` and score them with `metric` (a name or a
    function fn(logits, batch) -> [batch]; default the dataset's metric). Accuracy, and so
    `keep_correct`, compares the answers' logits whatever the metric.

    For the `kl` metric the clean value is 0 by definition and the counterfactual one is KL from clean.
    """
    batch_size = batch_size_for(model, batch_size)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    device = model_device(model)
    cols = {k: [] for k in ("clean", "cf", "correct", "top1")}
    bar = tqdm(total=len(dataset), desc="model behaviour", unit="ex", disable=not progress)
    graph = Graph.from_model(model)

    def last_logits(batch, tokens):
        # The pass stops at the final residual and unembeds the last positions only.
        with graph_hooks(model, graph, split_inputs=False, stop_at_final=True) as run:
            return run_to_final_logits(model, run, tokens, batch.attention_mask, batch.last).float()

    for indices, batch in dataset.batches(batch_size):
        batch = batch.to(device)
        clean, cf = last_logits(batch, batch.clean), last_logits(batch, batch.counterfactual)
        cols["clean"].append(compute_metric(metric, clean, batch, clean_logits=clean))
        cols["cf"].append(compute_metric(metric, cf, batch, clean_logits=clean))
        check_metric_values(cols["clean"][-1], metric, "the clean run", dataset, indices)
        check_metric_values(cols["cf"][-1], metric, "the counterfactual run", dataset, indices)
        cols["correct"].append(accuracy(clean, batch))
        cols["top1"].append(top1_accuracy(clean, batch))
        bar.update(len(batch.last))
    bar.close()
    cat = {k: torch.cat(v).cpu() for k, v in cols.items()}
    return Behaviour(cat["clean"], cat["cf"], cat["correct"], cat["top1"])


def keep_correct(dataset: PromptPairDataset, behaviour: Behaviour) -> PromptPairDataset:
    """The examples whose clean prompt the model gets right."""
    return dataset.subset([i for i, ok in enumerate(behaviour.correct.tolist()) if ok])
