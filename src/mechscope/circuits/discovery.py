"""Circuit discovery end to end: split a dataset, score edges with each method on the discovery half,
and measure faithfulness curves on the held-out half. Returns a JSON-ready summary.

Methods: eap, eap-ig, exact (non-positional circuits) and peap (span circuits over the dataset's
schema). Every curve point carries its size in concrete token-level edges, the axis on which
positional and non-positional circuits compare.

Every entry point takes `metric`: a name or a function fn(final logits [batch, vocab], batch) ->
[batch] (default: the dataset's metric); summaries record it by `metrics.metric_name`. Summaries also
record `signal` (M(model) - M(all ablated) on the evaluation set and its standard error) and
`warnings` (e.g. that normalized faithfulness is noise, `Faithfulness.weak_signal`).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Sequence

from ..devices import batch_size_for
from ..attribution import attribute, check_method
from ..attribution.peap import check_query_edges
from ..behaviour import check_compatible, keep_correct, measure_behaviour
from ..data.dataset import DatasetError, PromptPairDataset
from ..errors import ParameterError
from ..metrics import Metric, metric_name, resolve_metric
from .evaluation import DEFAULT_FRACTIONS, check_fractions, check_selection, faithfulness_curves, select_circuits


def prepare(model, dataset: PromptPairDataset, seed: int = 0, discovery_fraction: float = 0.5,
            only_correct: bool = True, batch_size: int | None = None, progress: bool = True, metric: Metric | None = None):
    """Measure the model's behaviour, keep the examples it gets right (with `only_correct`) and split
    them into discovery and evaluation halves. Returns (behaviour summary, discovery, evaluation)."""
    batch_size = batch_size_for(model, batch_size)
    _check_split(discovery_fraction)
    check_compatible(model, dataset)
    metric = resolve_metric(metric, dataset)
    behaviour = measure_behaviour(model, dataset, batch_size, progress=progress, metric=metric)
    kept = keep_correct(dataset, behaviour) if only_correct else dataset
    if len(kept) < 2:
        raise DatasetError(f"only {len(kept)} examples left after keeping the correct ones; nothing to split")
    discovery, evaluation = kept.split(discovery_fraction, seed=seed)
    if not len(discovery) or not len(evaluation):
        raise DatasetError(
            f"discovery_fraction {discovery_fraction} of the {len(kept)} examples kept leaves the "
            f"{'discovery' if not len(discovery) else 'evaluation'} half empty"
        )
    return behaviour.summary(metric), discovery, evaluation


def _check_split(discovery_fraction: float) -> None:
    if isinstance(discovery_fraction, bool) or not isinstance(discovery_fraction, numbers.Real) \
            or not 0 < discovery_fraction < 1:
        raise ParameterError(f"discovery_fraction must be a number between 0 and 1 (both halves non-empty), "
                             f"got {discovery_fraction!r}")


def signal_record(curve) -> tuple[dict, list[str]]:
    """(summary's `signal` entry, its warnings) from a curve's shared M(model) - M(all ablated)."""
    p = curve.points[0]
    message = p.weak_signal()
    return {"gap": p.gap, "gap_se": p.gap_se, "weak": message is not None}, [message] if message else []


def compare_methods(
    model,
    dataset: PromptPairDataset,
    methods: Sequence[str] = ("eap", "eap-ig"),
    *,
    seed: int = 0,
    discovery_fraction: float = 0.5,
    only_correct: bool = True,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    ablation: str = "counterfactual",
    steps: int = 5,
    batch_size: int | None = None,
    progress: bool = True,
    selection: str = "top_n",
    targets: Sequence[float] = (0.5, 0.8, 0.9),
    metric: Metric | None = None,
    query_edges: str = "per_key",
) -> tuple[dict, dict]:
    """Returns (summary, scores by method). With `only_correct` the examples the model gets wrong on
    the clean prompt are dropped first (the behaviour summary is of the whole dataset). `query_edges`:
    peap's query edges (`attribute`), per_key or whole_row."""
    batch_size = batch_size_for(model, batch_size)
    if not methods:
        raise ParameterError("no methods to compare")
    for method in methods:  # every choice checked before any model work
        check_method(method, steps, ablation, _query_edges(method, query_edges))
    check_selection(selection)
    fractions = check_fractions(fractions)
    _check_split(discovery_fraction)
    metric = resolve_metric(metric, dataset)
    behaviour, discovery, evaluation = prepare(model, dataset, seed, discovery_fraction, only_correct,
                                               batch_size, progress, metric)
    summary = {
        "model": getattr(model, "mechscope_name", ""),
        "task": dataset.task,
        "metric": metric_name(metric),
        "ablation": ablation,
        "selection": selection,
        "seed": seed,
        "n_examples": len(dataset),
        "n_kept": len(discovery) + len(evaluation),
        "n_discovery": len(discovery),
        "n_evaluation": len(evaluation),
        "behaviour": behaviour,
        "methods": {},
    }
    all_scores, selected = {}, {}
    for method in methods:
        scores = attribute(model, discovery, method, steps=steps, ablation=ablation, batch_size=batch_size,
                           progress=progress, metric=metric, query_edges=_query_edges(method, query_edges))
        selected[method] = (scores, select_circuits(scores, fractions, selection))
        all_scores[method] = scores
    # One evaluation for every method's circuits: they share each batch's clean and reference passes.
    curves = faithfulness_curves(model, selected, evaluation, fractions, selection, ablation,
                                 batch_size=batch_size, progress=progress, metric=metric)
    for method, curve in curves.items():
        if "signal" not in summary:
            summary["signal"], summary["warnings"] = signal_record(curve)
        summary["methods"][method] = curve.to_dict()
        # Concrete token-level edges needed to reach each normalized faithfulness (None: never).
        summary["methods"][method]["concrete_edges_for"] = {f"{t:g}": curve.edges_for(t) for t in targets}
    return summary, all_scores


def _query_edges(method: str, query_edges: str) -> str:
    """The query edges to ask `method` for: `query_edges` (checked) for peap; the others have none of
    their own."""
    check_query_edges(query_edges)
    return query_edges if method == "peap" else "per_key"


@dataclass
class CircuitDiscovery:
    """Everything `mechscope circuit` finds: the summary, the scores, the curves, the circuits on each
    curve (`circuits[method][i]` is measured by `curves[method].points[i]`), the circuit it saves (the
    smallest on the chosen method's curve whose normalized faithfulness reaches `target`, one of
    those circuits) and the evaluation and discovery halves."""

    summary: dict
    scores: dict  # method -> EdgeScores (the chosen method first, then the baseline)
    curves: dict  # method -> Curve
    circuit: Any  # SpanCircuit (peap) or Circuit
    circuits: dict  # method -> [SpanCircuit or Circuit per curve point]
    evaluation: PromptPairDataset
    discovery: PromptPairDataset


def discover_circuit(
    model,
    dataset: PromptPairDataset,
    method: str = "peap",
    *,
    seed: int = 0,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    selection: str = "greedy",
    target: float = 0.8,
    steps: int = 5,
    batch_size: int | None = None,
    progress: bool = True,
    metric: Metric | None = None,
    query_edges: str = "per_key",
) -> CircuitDiscovery:
    """Circuit discovery end to end, as `mechscope circuit` runs it: behaviour, discovery / evaluation
    split (only examples the model gets right), scores with `method` and, for peap, the non-positional
    EAP baseline, faithfulness curves of both on the held-out half, the circuit to save and the small
    circuits on the curves. `query_edges`: peap's query edges (`attribute`), per_key or whole_row."""
    batch_size = batch_size_for(model, batch_size)
    check_method(method, steps, query_edges=_query_edges(method, query_edges))
    check_selection(selection)
    fractions = check_fractions(fractions)
    metric = resolve_metric(metric, dataset)
    behaviour, discovery, evaluation = prepare(model, dataset, seed, batch_size=batch_size, progress=progress,
                                               metric=metric)
    methods = [method] + (["eap"] if method == "peap" else [])
    scores, circuits = {}, {}
    for m in methods:
        scores[m] = attribute(model, discovery, m, steps=steps, batch_size=batch_size, progress=progress,
                              metric=metric, query_edges=_query_edges(m, query_edges))
        circuits[m] = select_circuits(scores[m], fractions, selection)
    # Both methods' circuits in one evaluation: they share each batch's clean and reference passes.
    curves = faithfulness_curves(model, {m: (scores[m], circuits[m]) for m in methods}, evaluation, fractions,
                                 selection, batch_size=batch_size, progress=progress, metric=metric)
    curve = curves[method]
    pick = next((i for i, p in enumerate(curve.points) if p.normalized >= target), len(curve.points) - 1)
    circuit = circuits[method][pick]
    circuit.task = dataset.task  # saved with the circuit (circuit.json), with each edge's score
    circuit.set_scores(scores[method])
    signal, warnings = signal_record(curve)
    summary = {
        "model": getattr(model, "mechscope_name", ""),
        "task": dataset.task,
        "metric": metric_name(metric),
        "method": method,
        "selection": selection,
        "seed": seed,
        "n_examples": len(dataset),
        "n_discovery": len(discovery),
        "n_evaluation": len(evaluation),
        "model_accuracy": behaviour["model_accuracy"],
        "metric_clean": behaviour["metric_clean"],
        "metric_counterfactual": behaviour["metric_counterfactual"],
        "metric_model": curve.points[0].metric_model,
        "metric_ablated": curve.points[0].metric_empty,
        "concrete_full": curve.concrete_full,
        "signal": signal,
        "warnings": warnings,
        "circuit": {"fraction": curve.points[pick].fraction, "target": target, **curve.points[pick].to_dict()},
        "methods": {
            m: {
                "cpr": c.cpr,
                "cmd": c.cmd,
                "cpr_concrete": c.cpr_concrete,
                "cmd_concrete": c.cmd_concrete,
                "points": [
                    {"fraction": p.fraction, "edges": p.n_edges, "concrete_edges": p.concrete_edges,
                     "soft": p.soft, "hard": p.hard, "normalized": p.normalized}
                    for p in c.points
                ],
            }
            for m, c in curves.items()
        },
    }
    return CircuitDiscovery(summary, scores, curves, circuit, circuits, evaluation, discovery)
