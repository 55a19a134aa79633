"""ACDC, automatic circuit discovery by greedy edge pruning (Conmy et al. 2023; docs/method.md §11).

Start from the whole graph. Visit the downstream nodes from the logits backwards (reverse
topological order: the logits, then the last MLP's input, that layer's value, key and query inputs,
and so on down to layer 0); for each, visit its incoming edges from the latest parent to the input
node. Ablate the edge tentatively (to its reference: counterfactual, mean or zero) on top of the
edges already removed, run the model on every example, and compare the metric with that of the
current circuit:

  * metric "kl" (the default, as in ACDC): D = mean KL(p_model || p_circuit) at the final position;
    the change is the signed D(candidate) - D(current), so an ablation that brings the circuit closer
    to the model (a negative change) is always accepted, as in the paper's algorithm;
  * a task metric ("task" = the dataset's own, or a metric name or function): the change is
    |mean M(candidate) - mean M(current)|.

The edge stays ablated when its change is <= tau (so tau = 0 removes exactly the edges whose change
is not positive), else it is restored. An accepted removal becomes the current circuit, against which
the next edge is compared (the standard ACDC update). One ablated run over the dataset per tested
edge (examples batched; a dataset larger than the batch size takes several forwards per edge).

A downstream node whose reader (the head of a query input, the heads of a key / value group, the MLP
of an MLP input) has no surviving outgoing edge is skipped: ablating its inputs cannot change the
output. Its incoming edges are removed from the circuit untested, and their score is NaN. Edges
outside `candidates` (a restriction to part of the graph) are never tested: they stay in the
circuit, with score NaN.

`scores[i, e]` holds the change measured when edge e was tested in the run of `taus[i]` (the
quantity compared with tau); NaN where it was not tested. The result depends on tau and on the
visiting order; the order is fixed as above.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..attribution.references import check_ablation, clean_pass, mean_reference, reference_outputs
from ..attribution.runner import Ablation, check_ablatable, graph_hooks, run_to_final_logits
from ..behaviour import check_compatible
from ..data.dataset import METRICS, PromptPairDataset
from ..devices import HOST, batch_size_for, model_device
from ..errors import ParameterError, check_count
from ..fileio import OutputError, atomic_dir, write_json
from ..graph import Graph
from ..metrics import Metric, check_metric_values, compute_metric, metric_name, resolve_metric
from .circuit import Circuit
from .evaluation import Curve, Faithfulness, _Evaluator, warn_weak_signal
from .span_circuit import ALL_TOKENS, SpanCircuit

ACDC_METRICS = ("kl", "task")


def check_taus(taus) -> list[float]:
    """`taus` (a number or a sequence of numbers) as a list of floats, or ParameterError unless there is
    at least one and every one is a finite number >= 0."""
    values = [taus] if isinstance(taus, (int, float)) else taus
    try:
        values = list(values)
    except TypeError:
        raise ParameterError(f"tau must be a number or a list of numbers, got {taus!r}") from None
    if not values:
        raise ParameterError("the tau sweep is empty; give at least one threshold")
    out = []
    for t in values:
        try:
            value = float(t)
        except (TypeError, ValueError):
            value = None
        if value is None or isinstance(t, bool) or not math.isfinite(value) or value < 0:
            raise ParameterError(f"tau must be a finite number >= 0, got {t!r}")
        out.append(value)
    return out


def check_acdc_metric(metric) -> Metric:
    """`metric` if ACDC can use it: "kl", "task" (the dataset's metric), a metric name or a function."""
    if callable(metric):
        return metric
    if not isinstance(metric, str) or (metric not in ACDC_METRICS and metric not in METRICS):
        raise ParameterError(f"unknown ACDC metric {metric!r}; choose kl (KL divergence to the model), task (the "
                             f"dataset's metric) or one of {', '.join(m for m in METRICS if m != 'kl')}")
    return metric


def check_candidates(graph: Graph, candidates) -> torch.Tensor:
    """[n_edges] bool mask of the edges ACDC may test (all when None), or ParameterError."""
    if candidates is None:
        return torch.ones(graph.n_edges, dtype=torch.bool, device=HOST)
    mask = torch.as_tensor(candidates, device=HOST)
    if mask.dtype != torch.bool or tuple(mask.shape) != (graph.n_edges,):
        raise ParameterError(f"candidates must be a boolean mask over the graph's {graph.n_edges} edges, "
                             f"got {tuple(mask.shape)} {mask.dtype}")
    return mask


def edges_into(graph: Graph, downstream: Sequence[int]) -> torch.Tensor:
    """[n_edges] bool: the edges whose downstream node is one of `downstream` (indices)."""
    wanted = torch.zeros(graph.n_downstream, dtype=torch.bool, device=HOST)
    wanted[list(downstream)] = True
    return wanted[graph.edge_down]


def last_layers(graph: Graph, k: int) -> torch.Tensor:
    """[n_edges] bool: the edges into the logits and into every downstream node (q, k, v and MLP
    inputs) of the last `k` layers: the part of the graph `acdc(..., candidates=...)` may prune."""
    check_count("k", k, minimum=0)
    if k > graph.n_layers:
        raise ParameterError(f"last layers: {k} is more than the model's {graph.n_layers} layers")
    first = graph.q_slice(graph.n_layers - k).start if k else graph.logits_index
    return edges_into(graph, range(first, graph.n_downstream))


@dataclass
class ACDCResult:
    """What `acdc` found: one circuit per tau (in the order of `taus`), the change measured for every
    tested edge ([n_taus, n_edges], NaN where untested), and the cost of each run."""

    graph: Graph
    taus: list[float]
    circuits: list[Circuit]
    scores: torch.Tensor  # [n_taus, n_edges] float64
    metric: str
    ablation: str
    candidates: torch.Tensor  # [n_edges] bool: edges ACDC was allowed to test
    max_forwards: int  # per tau: the candidate edges (an upper bound on the edges tested)
    n_forwards: list[int] = field(default_factory=list)  # edges tested per tau (one run over the data each)
    n_model_passes: list[int] = field(default_factory=list)  # batched model forwards per tau
    seconds: list[float] = field(default_factory=list)
    n_examples: int = 0
    model: str = ""
    curve: Curve | None = None  # faithfulness of the circuits, sorted by edge count (`evaluate_acdc`)
    faithfulness: list[Faithfulness] = field(default_factory=list)  # the same points, in the order of taus

    def survival_scores(self) -> torch.Tensor:
        """[n_edges] float64: for each edge the largest tau at which it is in the circuit, 0 when it is
        in none. Thresholding it at each tau of the sweep gives back the union of the circuits of that
        tau and larger ones: the circuits themselves when they are nested (larger tau, fewer edges), so
        its ROC curve is then the one traced by the sweep's circuits. Ties (an edge never kept, or kept
        only at tau = 0) score 0 together."""
        out = torch.zeros(self.graph.n_edges, dtype=torch.float64, device=HOST)
        for tau, c in zip(self.taus, self.circuits):
            out = torch.where(c.edges, torch.clamp(out, min=tau), out)
        return out

    def summary(self) -> dict:
        total = self.graph.n_edges
        runs = []
        for i, (tau, c) in enumerate(zip(self.taus, self.circuits)):
            tested = ~self.scores[i].isnan()
            runs.append({"tau": tau, "n_edges": c.n_edges, "fraction": c.n_edges / total,
                         "edges_tested": self.n_forwards[i], "model_passes": self.n_model_passes[i],
                         "seconds": self.seconds[i], "candidates_removed": int((self.candidates & ~c.edges).sum()),
                         "edges_untested": int(self.candidates.sum() - tested.sum()),
                         "circuit_file": circuit_file_name(tau)})
            if self.faithfulness:
                f = self.faithfulness[i]
                runs[-1].update(normalized=f.normalized, soft=f.soft, hard=f.hard)
        out = {"method": "acdc", "model": self.model, "metric": self.metric, "ablation": self.ablation,
               "n_examples": self.n_examples, "graph": self.graph.spec(), "n_graph_edges": total,
               "n_candidates": int(self.candidates.sum()), "max_forwards_per_tau": self.max_forwards,
               "total_edges_tested": sum(self.n_forwards), "total_seconds": sum(self.seconds), "runs": runs}
        if self.curve is not None:
            out["curve"] = self.curve.to_dict()
        return out

    def save(self, out: str | os.PathLike) -> Path:
        """Write into the new (or empty) directory `out`, all at once: one circuit JSON per tau
        (`circuit_tau_<tau>.json`, Circuit's format), `summary.json`, `scores.json` (every edge's name
        and measured change per tau, null where untested) and, with a curve, `curve.json`."""
        out = Path(out)
        check_acdc_out(out)
        with atomic_dir(out) as tmp:
            for tau, c in zip(self.taus, self.circuits):
                c.save(tmp / circuit_file_name(tau))
            write_json(tmp / "summary.json", self.summary())
            names = [self.graph.edge_name(e) for e in range(self.graph.n_edges)]
            changes = {repr(t): [None if math.isnan(v) else v for v in row]
                       for t, row in zip(self.taus, self.scores.tolist())}
            write_json(tmp / "scores.json", {"edges": names, "metric": self.metric, "change": changes})
            if self.curve is not None and len(self.taus) > 1:
                write_json(tmp / "curve.json", self.curve.to_dict())
        return out


def circuit_file_name(tau: float) -> str:
    return f"circuit_tau_{tau!r}.json"


def check_acdc_out(out: str | os.PathLike) -> None:
    """OutputError unless `out` can become ACDC's output directory (new or empty, writable)."""
    from ..fileio import check_parent_writable

    out = Path(out)
    check_parent_writable(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and is not an empty directory; choose a new --out")


class _Runner:
    """The dataset's batches with their clean logits and references, held for every ablated run."""

    def __init__(self, model, graph: Graph, dataset: PromptPairDataset, ablation: str, metric: Metric,
                 batch_size: int, reference: PromptPairDataset | None):
        self.model, self.graph, self.dataset, self.metric = model, graph, dataset, metric
        device = model_device(model)
        mean = mean_reference(model, graph, reference or dataset, batch_size) if ablation == "mean" else None
        self.batches = []
        for indices, batch in dataset.batches(batch_size):
            batch = batch.to(device)
            clean_up, _, clean = clean_pass(model, graph, batch, attention=False)
            ref = reference_outputs(model, graph, batch, ablation, clean_up, mean)
            self.batches.append((indices, batch, clean, ref))
        self.n = len(dataset)
        self.passes = 0

    @torch.no_grad()
    def value(self, keep: torch.Tensor, what: str) -> float:
        """Mean over the dataset of the metric of the run with `keep` ([n_up, n_down], 1 keeps)."""
        total = 0.0
        for indices, batch, clean, ref in self.batches:
            with graph_hooks(self.model, self.graph, ablation=Ablation(keep, ref), stop_at_final=True) as run:
                logits = run_to_final_logits(self.model, run, batch.clean, batch.attention_mask, batch.last)
            values = compute_metric(self.metric, logits, batch, clean_logits=clean).double()
            check_metric_values(values, self.metric, what, self.dataset, indices)
            total += float(values.sum())
            self.passes += 1
        return total / self.n


def acdc(
    model,
    dataset: PromptPairDataset,
    taus: float | Sequence[float],
    metric: Metric = "kl",
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int | None = None,
    candidates: torch.Tensor | None = None,
    progress: bool = True,
    evaluate: bool = True,
) -> ACDCResult:
    """Run ACDC once per tau of `taus` (a number or a list: a sweep) on every example of `dataset`.

    `metric`: "kl" (KL divergence of the circuit's final-position distribution from the model's;
    signed change), "task" (the dataset's metric) or a metric name / function (|change| of its mean).
    `ablation`: counterfactual | mean (over `reference`, default the dataset) | zero. `candidates`:
    [n_edges] bool, the edges ACDC may test (default all; `last_layers(graph, k)` restricts it to the
    edges into the last k layers and the logits); the others stay in the circuit. With `evaluate`, the
    circuits' faithfulness (the dataset's metric, same examples and ablation) is measured and kept as
    `result.curve`, points sorted by edge count with `fraction` = edges / all graph edges.
    """
    taus = check_taus(taus)
    metric = check_acdc_metric(metric)
    check_ablation(ablation)
    batch_size = batch_size_for(model, batch_size)
    check_compatible(model, dataset)
    graph = Graph.from_model(model)
    candidates = check_candidates(graph, candidates)
    check_ablatable(model)
    task_metric = resolve_metric(None if metric == "task" else metric, dataset)
    signed = metric == "kl"
    runner = _Runner(model, graph, dataset, ablation, task_metric, batch_size, reference)
    n_max = int(candidates.sum())
    if progress:
        tqdm.write(file=sys.stderr, s=f"ACDC: at most {n_max} edges to test per tau ({len(taus)} tau, {n_max * len(taus)} in all), "
                   f"one run over {len(dataset)} examples each; nodes that lose every outgoing edge are skipped")
    result = ACDCResult(graph, taus, [], torch.full((len(taus), graph.n_edges), float("nan"), dtype=torch.float64,
                                                    device=HOST),
                        metric=metric_name(metric) if metric != "task" else f"task:{metric_name(task_metric)}",
                        ablation=ablation, candidates=candidates, max_forwards=n_max, n_examples=len(dataset),
                        model=getattr(dataset, "model", "") or "")
    for i, tau in enumerate(taus):
        start, passes = time.perf_counter(), runner.passes
        edges, tested = _prune(runner, graph, candidates, tau, signed, result.scores[i], progress)
        result.circuits.append(Circuit(graph, edges, model=result.model, method="acdc",
                                       info={"selection": "acdc", "tau": tau, "metric": result.metric,
                                             "ablation": ablation, "edges_tested": tested}))
        result.n_forwards.append(tested)
        result.n_model_passes.append(runner.passes - passes)
        result.seconds.append(time.perf_counter() - start)
    if evaluate:
        evaluate_acdc(model, result, dataset, ablation, reference, batch_size, progress)
    return result


def _prune(runner: _Runner, graph: Graph, candidates: torch.Tensor, tau: float, signed: bool,
           scores: torch.Tensor, progress: bool) -> tuple[torch.Tensor, int]:
    """One ACDC pass at threshold `tau`: (circuit edges [n_edges] bool, edges tested); fills `scores`."""
    device = model_device(runner.model)
    keep = torch.ones(graph.n_upstream, graph.n_downstream, device=device)
    keep[~graph.edge_mask.to(device)] = 0.0  # not edges: nothing to ablate
    index = graph.dense(torch.arange(graph.n_edges, device=HOST), fill=-1)  # [n_up, n_down] edge index
    cand = graph.dense(candidates, fill=False)
    alive_out = graph.edge_mask.clone()  # [n_up, n_down]: surviving outgoing edges, updated as we prune
    owners = graph.downstream_owner()
    current = runner.value(keep, "the whole model")
    tested = 0
    bar = tqdm(total=int(candidates.sum()), desc=f"ACDC tau={tau:g}", unit="edge", disable=not progress)
    for v in range(graph.n_downstream - 1, -1, -1):
        parents = [u for u in range(graph.n_upstream - 1, -1, -1) if cand[u, v]]
        if not parents:
            continue
        if owners[v] and not any(alive_out[u].any() for u in owners[v]):
            for u in parents:  # the reader writes nothing the output sees: its inputs cannot matter
                keep[u, v] = 0.0
                alive_out[u, v] = False
            bar.update(len(parents))
            continue
        for u in parents:
            keep[u, v] = 0.0
            value = runner.value(keep, f"the run with edge {graph.upstream_names[u]}->{graph.downstream_names[v]} "
                                       "ablated")
            change = value - current if signed else abs(value - current)
            scores[int(index[u, v])] = change
            tested += 1
            if change <= tau:
                current = value
                alive_out[u, v] = False
            else:
                keep[u, v] = 1.0
            bar.update(1)
    bar.close()
    edges = keep.to(HOST).bool()[graph.edge_up, graph.edge_down]
    return edges, tested


def evaluate_acdc(model, result: ACDCResult, dataset: PromptPairDataset, ablation: str = "counterfactual",
                  reference: PromptPairDataset | None = None, batch_size: int | None = None,
                  progress: bool = True, metric: Metric | None = None) -> Curve:
    """Faithfulness of every circuit of `result` on `dataset` (one ablated run each), as a Curve whose
    points are sorted by edge count, `fraction` = edges / all graph edges (ACDC's circuits are not at
    preset fractions; CPR and CMD integrate over the fractions the sweep reached). Sets `result.curve`
    and `result.faithfulness` (the points in the order of `result.taus`); warns when normalized
    faithfulness is noise. `metric`: default the dataset's."""
    batch_size = batch_size_for(model, batch_size)
    order = sorted(range(len(result.circuits)), key=lambda i: (result.circuits[i].n_edges, -result.taus[i]))
    circuits = [result.circuits[i] for i in order]
    points: list[Faithfulness] = _Evaluator(model, dataset, ablation, reference, batch_size, metric).run(
        circuits, progress)
    for p in points:
        p.fraction = p.n_edges / result.graph.n_edges
    full = SpanCircuit.full(result.graph, (ALL_TOKENS,)).concrete_edges(dataset)["total"]
    curve = Curve(method="acdc", selection="tau", points=points, concrete_full=full)
    result.curve = curve
    result.faithfulness = [points[order.index(i)] for i in range(len(order))]
    if points:
        warn_weak_signal(points[0])
    return curve
