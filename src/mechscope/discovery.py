"""Circuit discovery end to end: split a dataset, score edges with each method on the discovery half,
and measure faithfulness curves on the held-out half. Returns a JSON-ready summary.

Methods: eap, eap-ig, exact (non-positional circuits) and peap (span circuits over the dataset's
schema). Every curve point carries its size in concrete token-level edges, the axis on which
positional and non-positional circuits compare.
"""

from __future__ import annotations

from typing import Sequence

from .attribution import attribute
from .behaviour import check_compatible, keep_correct, measure_behaviour
from .data.dataset import DatasetError, PromptPairDataset
from .evaluation import DEFAULT_FRACTIONS, faithfulness_curve


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
    batch_size: int = 16,
    progress: bool = True,
    selection: str = "top_n",
    targets: Sequence[float] = (0.5, 0.8, 0.9),
) -> tuple[dict, dict]:
    """Returns (summary, scores by method). With `only_correct` the examples the model gets wrong on
    the clean prompt are dropped first (the behaviour summary is of the whole dataset)."""
    check_compatible(model, dataset)
    behaviour = measure_behaviour(model, dataset, batch_size, progress=progress)
    kept = keep_correct(dataset, behaviour) if only_correct else dataset
    if len(kept) < 2:
        raise DatasetError(f"only {len(kept)} examples left after keeping the correct ones; nothing to split")
    discovery, evaluation = kept.split(discovery_fraction, seed=seed)
    summary = {
        "model": getattr(model, "mechscope_name", ""),
        "task": dataset.task,
        "metric": dataset.metric,
        "ablation": ablation,
        "selection": selection,
        "seed": seed,
        "n_examples": len(dataset),
        "n_kept": len(kept),
        "n_discovery": len(discovery),
        "n_evaluation": len(evaluation),
        "behaviour": behaviour.summary(dataset.metric),
        "methods": {},
    }
    all_scores = {}
    for method in methods:
        scores = attribute(model, discovery, method, steps=steps, ablation=ablation, batch_size=batch_size,
                           progress=progress)
        curve = faithfulness_curve(model, scores, evaluation, fractions=fractions, selection=selection,
                                   ablation=ablation, batch_size=batch_size, progress=progress)
        summary["methods"][method] = curve.to_dict()
        # Concrete token-level edges needed to reach each normalized faithfulness (None: never).
        summary["methods"][method]["concrete_edges_for"] = {f"{t:g}": curve.edges_for(t) for t in targets}
        all_scores[method] = scores
    return summary, all_scores
