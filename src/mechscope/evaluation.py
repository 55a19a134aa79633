"""Faithfulness of circuits by exact edge ablation (../shared/method.md §6).

The model runs on the clean prompt with every edge outside the circuit patched to its reference value.
  soft       F = mean M(C) / mean M(model)                          (PEAP)
  hard       fraction of examples whose argmax under C equals the model's argmax   (PEAP)
  normalized f = (mean M(C) - mean M(empty)) / (mean M(model) - mean M(empty))   (Hanna et al.; MIB)
Curves evaluate circuits at fractions of all edges; CPR is the area under f over the fraction axis
(trapezoid, higher is better) and CMD the area under |1 - f| (lower is better).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .attribution.references import check_ablation, mean_reference, reference_outputs, upstream_outputs
from .attribution.runner import Ablation, graph_hooks
from .behaviour import check_compatible
from .circuits import Circuit
from .data.dataset import PromptPairDataset
from .graph import Graph
from .metrics import accuracy, compute_metric, final_logits

DEFAULT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class Faithfulness:
    n_edges: int
    soft: float
    hard: float
    normalized: float
    metric_circuit: float
    metric_model: float
    metric_empty: float
    circuit_accuracy: float
    model_accuracy: float
    n_examples: int
    fraction: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Totals:
    """Per-example sums accumulated over batches for one circuit."""

    metric: float = 0.0
    agree: float = 0.0
    correct: float = 0.0


class _Evaluator:
    """Runs each batch's clean, reference and empty passes once and any number of circuits on it."""

    def __init__(self, model, dataset: PromptPairDataset, ablation: str, reference, batch_size: int):
        check_ablation(ablation)
        check_compatible(model, dataset)
        self.model, self.dataset, self.ablation = model, dataset, ablation
        self.graph = Graph.from_model(model)
        self.batch_size = batch_size
        self.mean = mean_reference(model, self.graph, reference or dataset, batch_size) if ablation == "mean" else None

    @torch.no_grad()
    def run(self, circuits: Sequence[Circuit], progress: bool = True) -> list[Faithfulness]:
        model, graph, ds = self.model, self.graph, self.dataset
        device = model.cfg.device
        totals = [_Totals() for _ in circuits]
        model_t, empty_t = _Totals(), _Totals()
        keeps = [c.keep_matrix().to(device) for c in circuits]
        bar = tqdm(total=len(ds) * (len(circuits) + 1), desc="evaluating circuits", unit="run", disable=not progress)
        for _, batch in ds.batches(self.batch_size):
            batch = batch.to(device)
            clean_up = upstream_outputs(model, graph, batch.clean, batch.attention_mask)
            clean = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)
            reference = reference_outputs(model, graph, batch, self.ablation, clean_up, self.mean)
            top = clean.argmax(-1)

            def score(keep: torch.Tensor, into: _Totals) -> None:
                with graph_hooks(model, graph, ablation=Ablation(keep, reference)):
                    logits = final_logits(model(batch.clean, attention_mask=batch.attention_mask), batch.last)
                into.metric += float(compute_metric(ds.metric, logits, batch, clean_logits=clean).sum())
                into.agree += float((logits.argmax(-1) == top).sum())
                into.correct += float(accuracy(logits, batch).sum())

            model_t.metric += float(compute_metric(ds.metric, clean, batch, clean_logits=clean).sum())
            model_t.agree += len(top)
            model_t.correct += float(accuracy(clean, batch).sum())
            score(torch.zeros_like(keeps[0]) if keeps else torch.zeros(graph.n_upstream, graph.n_downstream), empty_t)
            bar.update(len(top))
            for keep, into in zip(keeps, totals):
                score(keep, into)
                bar.update(len(top))
        bar.close()
        n = len(ds)
        m_model, m_empty = model_t.metric / n, empty_t.metric / n
        out = []
        for c, t in zip(circuits, totals):
            m_c = t.metric / n
            out.append(
                Faithfulness(
                    n_edges=c.n_edges,
                    soft=_ratio(m_c, m_model),
                    hard=t.agree / n,
                    normalized=_ratio(m_c - m_empty, m_model - m_empty),
                    metric_circuit=m_c,
                    metric_model=m_model,
                    metric_empty=m_empty,
                    circuit_accuracy=t.correct / n,
                    model_accuracy=model_t.correct / n,
                    n_examples=n,
                )
            )
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def evaluate(
    model,
    circuit: Circuit,
    dataset: PromptPairDataset,
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Faithfulness:
    """Soft, hard and normalized faithfulness of one circuit on `dataset`."""
    circuit.check_model(model)
    return _Evaluator(model, dataset, ablation, reference, batch_size).run([circuit], progress)[0]


@dataclass
class Curve:
    method: str
    selection: str
    points: list[Faithfulness] = field(default_factory=list)

    @property
    def fractions(self) -> list[float]:
        return [p.fraction for p in self.points]

    def cpr(self) -> float:
        """Area under normalized faithfulness over the fraction-of-edges axis (trapezoid)."""
        return _trapezoid(self.fractions, [p.normalized for p in self.points])

    def cmd(self) -> float:
        """Area under |1 - normalized faithfulness| over the fraction-of-edges axis (trapezoid)."""
        return _trapezoid(self.fractions, [abs(1 - p.normalized) for p in self.points])

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "selection": self.selection,
            "cpr": self.cpr(),
            "cmd": self.cmd(),
            "points": [p.to_dict() for p in self.points],
        }


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def faithfulness_curve(
    model,
    scores,
    dataset: PromptPairDataset,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    selection: str = "top_n",
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int = 16,
    progress: bool = True,
) -> Curve:
    """Faithfulness of circuits of `fractions` x all edges, selected from `scores` by `selection`."""
    select: Callable = {"top_n": scores.top_n, "greedy": scores.greedy}[selection]
    n_total = scores.graph.n_edges
    circuits = [select(max(1, round(f * n_total))) for f in fractions]
    for c in circuits:
        c.check_model(model)
    results = _Evaluator(model, dataset, ablation, reference, batch_size).run(circuits, progress)
    for f, r in zip(fractions, results):
        r.fraction = f
    return Curve(method=scores.method, selection=selection, points=results)
