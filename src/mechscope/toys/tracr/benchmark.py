"""Circuit finders against compiled ground truth: node- and edge-level ROC AUC per program and method.

For every program of the suite: compile it, make a task (clean / counterfactual pairs whose output
differs), read the ground-truth circuit off the craft model, score every edge with each method, and
compute the AUROC of |score| against the circuit (the contrast circuit of `ground_truth.py`; the
program's whole circuit is reported beside it).

Edge scores per method: EAP and EAP-IG, |mean over examples of the edge's score|; PEAP, the largest
|score| of the edge at any position (`aggregation="signed_max"` over token-level instances, then max over
spans); exact patching, the mean over examples of |change in M| when the edge alone is ablated to
its counterfactual value; ACDC, a sweep over ACDC_TAUS with the task metric (|change in mean M|; the
KL divergence sees nothing of a numerical program's single output logit), each edge scored by the
largest tau at which it stays in the circuit, 0 when it is in none (`ACDCResult.survival_scores`: when
the circuits are nested, its ROC curve is the one the sweep's circuits trace, with (0, 0) and (1, 1) as
its ends and straight lines between). A node's score is the sum of the |scores| of the edges into and out of it
(a head's q/k/v inputs included); nodes are the heads and MLPs (the input and logits are in every
circuit and not scored).

A compiled model leaves every edge outside its circuit exactly 0, so a gradient method can reach
AUROC 1 with circuit edges that score 1e-15 and rank above the rest only because the rest are exact
zeros. Each AUROC is therefore reported twice: as computed, and "floored" (`floor_scores`): a
method's edge scores below FLOOR times its largest |score| on the program are set to 0 first, so they
tie with everything outside the circuit (ties count one half). Floored node scores are summed from
the floored edge scores. For ACDC the floor sets to 0 the edges kept only at a tau below FLOOR times
the sweep's largest. Edges ACDC never keeps tie at 0, circuit edges among them included, so exact
zeros do not flatter it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from ...devices import HOST, resolve_device
from ...attribution import attribute
from ...errors import MechscopeError
from ...attribution.patching import exact_scores
from ...graph import Graph
from .compile import CompiledProgram, ProgramSpec, compile_program
from .ground_truth import GroundTruth, ground_truth, varying_directions
from .programs import SUITE
from .tasks import make_tracr_task

METHODS = ("eap", "eap-ig", "peap", "exact", "acdc")
# ACDC's thresholds on tracr programs (changes of the task metric): circuit edges change it by order 0.1
# to 1, edges outside the circuit by rounding error.
ACDC_TAUS = (1e-6, 1e-4, 1e-2, 0.1, 0.3, 1.0)
FLOOR = 1e-6  # scores below FLOOR * the method's largest |score| count as 0 in the floored AUROCs


class BenchmarkError(MechscopeError, ValueError):
    """An unknown program or method, or too few examples."""


def check_choices(programs, methods, n: int, extra=()) -> None:
    """Raise BenchmarkError unless every program is in the suite (or `extra`), every method known
    and n >= 2."""
    unknown = [p for p in programs if p not in SUITE and p not in extra]
    if unknown:
        raise BenchmarkError(f"unknown program(s) {', '.join(unknown)}; the suite has {', '.join(SUITE)}")
    if not methods or any(m not in METHODS for m in methods):
        raise BenchmarkError(f"unknown method in {', '.join(methods) or 'an empty list'}; choose from {', '.join(METHODS)}")
    if n < 2:
        raise BenchmarkError("--n must be at least 2")


def auroc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve of `scores` for the binary `labels` (ties count one half); NaN when a
    class is empty. Equals the Mann-Whitney U statistic over (positive, negative) pairs."""
    scores = scores.double().flatten()
    labels = labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    pos, neg = scores[labels], scores[~labels]
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (n_pos * n_neg))


def floor_scores(scores: torch.Tensor, floor: float = FLOOR) -> torch.Tensor:
    """`scores` (float64) with every entry whose |value| is below `floor` * max |score| set to 0;
    unchanged when every score is 0."""
    s = scores.double()
    top = float(s.abs().max()) if s.numel() else 0.0
    if top == 0.0:
        return s.clone()
    return torch.where(s.abs() < floor * top, torch.zeros_like(s), s)


def method_edge_scores(compiled: CompiledProgram, dataset, method: str, batch_size: int = 64) -> torch.Tensor:
    """[n_edges] non-negative edge scores of `method` on `dataset`."""
    model = compiled.model
    if method == "exact":
        return exact_scores(model, Graph.from_model(model), dataset, batch_size=batch_size, progress=False,
                            absolute=True)
    if method == "acdc":
        from ...circuits.acdc import acdc

        result = acdc(model, dataset, ACDC_TAUS, metric="task", batch_size=batch_size, progress=False, evaluate=False)
        return result.survival_scores()
    if method == "peap":
        scores = attribute(model, dataset, "peap", batch_size=batch_size, progress=False, aggregation="signed_max")
        return scores.values.abs().amax(0)
    return attribute(model, dataset, method, batch_size=batch_size, progress=False).values.abs()


def node_scores(graph: Graph, edge_scores: torch.Tensor) -> torch.Tensor:
    """[n_upstream]: sum of |score| over each node's outgoing edges and the edges into its inputs."""
    out = torch.zeros(graph.n_upstream, dtype=torch.float64, device=HOST)
    s = edge_scores.double().abs()
    out.index_add_(0, graph.edge_up, s)
    into = torch.zeros(graph.n_downstream, dtype=torch.float64, device=HOST).index_add_(0, graph.edge_down, s)
    for v, owners in enumerate(graph.downstream_owner()):  # a shared k/v input counts for each head
        for u in owners:
            out[u] += into[v]
    return out


AUROC_KEYS = ("edge_auroc", "node_auroc", "program_edge_auroc", "program_node_auroc")
FLOOR_KEYS = tuple(f"{k}_floor" for k in AUROC_KEYS)


@dataclass
class ProgramResult:
    program: str
    description: str
    n_layers: int
    n_heads: int
    n_edges: int
    n_examples: int
    truth: dict
    program_truth: dict
    metric_clean: float
    metric_counterfactual: float
    inputs: dict = field(default_factory=dict)  # how the task's inputs were drawn (tasks.make_tracr_task)
    edge_auroc: dict[str, float] = field(default_factory=dict)
    node_auroc: dict[str, float] = field(default_factory=dict)
    program_edge_auroc: dict[str, float] = field(default_factory=dict)
    program_node_auroc: dict[str, float] = field(default_factory=dict)
    edge_auroc_floor: dict[str, float] = field(default_factory=dict)
    node_auroc_floor: dict[str, float] = field(default_factory=dict)
    program_edge_auroc_floor: dict[str, float] = field(default_factory=dict)
    program_node_auroc_floor: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    # Every edge of the graph: its name, whether it is in the contrast / whole circuit, and each
    # method's score (the |score| the AUROCs rank, before any floor).
    edges: dict = field(default_factory=dict)


def circuit_aurocs(graph: Graph, scores: torch.Tensor, truth: GroundTruth, program_truth: GroundTruth) -> dict:
    """The eight AUROCs of one method's edge `scores`: edge and node level against the contrast
    circuit and the whole circuit, as computed and floored (`floor_scores`)."""
    out = {}
    for suffix, s in (("", scores.double()), ("_floor", floor_scores(scores))):
        for prefix, t in (("", truth), ("program_", program_truth)):
            out[f"{prefix}edge_auroc{suffix}"] = auroc(s, t.edges)
            out[f"{prefix}node_auroc{suffix}"] = _node_auroc(graph, s, t)
    return out


def benchmark_program(name: str, n: int = 48, seed: int = 0, methods=METHODS, batch_size: int = 64,
                      device: str | torch.device | None = "cpu", spec: ProgramSpec | None = None) -> ProgramResult:
    """Compile program `name` (of the suite, or `spec`), make its task and score every method against
    the ground truth; the compiled model runs on `device` (None: CUDA when available)."""
    from ...behaviour import measure_behaviour

    spec = spec if spec is not None else SUITE[name]
    compiled = compile_program(spec.build(), spec.vocab, spec.max_seq_len, name=name)
    compiled.model.to(resolve_device(device))
    dataset = make_tracr_task(compiled, n=n, seed=seed, unique=spec.unique_tokens,
                              pad_counterfactuals=spec.pad_counterfactuals)
    program_truth = ground_truth(compiled)
    batch = dataset.batch()
    varying = varying_directions(compiled, batch.clean, batch.counterfactual, batch.attention_mask)
    truth = program_truth.restrict(varying)
    behaviour = measure_behaviour(compiled.model, dataset, progress=False)
    graph = truth.graph
    result = ProgramResult(
        program=name, description=spec.description, n_layers=graph.n_layers, n_heads=graph.n_heads,
        n_edges=graph.n_edges, n_examples=len(dataset), truth=truth.summary(), program_truth=program_truth.summary(),
        metric_clean=float(behaviour.metric_clean.mean()), metric_counterfactual=float(behaviour.metric_counterfactual.mean()),
        inputs=dict(dataset.info.get("inputs", {})),
        edges={"names": [graph.edge_name(e) for e in range(graph.n_edges)], "in_circuit": truth.edges.tolist(),
               "in_program_circuit": program_truth.edges.tolist(), "scores": {}})
    for method in methods:
        start = time.perf_counter()
        scores = method_edge_scores(compiled, dataset, method, batch_size).detach().to(HOST).double()
        result.seconds[method] = time.perf_counter() - start
        for key, value in circuit_aurocs(graph, scores, truth, program_truth).items():
            getattr(result, key)[method] = value
        result.edges["scores"][method] = scores.tolist()
    return result


def _node_auroc(graph: Graph, scores: torch.Tensor, truth: GroundTruth) -> float:
    nodes = node_scores(graph, scores)[1:]  # heads and MLPs
    return auroc(nodes, truth.nodes[1:])


def mean_over_programs(results: list[ProgramResult], key: str, method: str) -> float:
    values = [getattr(r, key)[method] for r in results if not math.isnan(getattr(r, key)[method])]
    return sum(values) / len(values) if values else float("nan")


def run_benchmark(programs=None, n: int = 48, seed: int = 0, methods=METHODS, progress=None,
                  device: str | torch.device | None = "cpu", specs: dict[str, ProgramSpec] | None = None) -> dict:
    """Every program of the suite (or `programs`: names of the suite or keys of `specs`, programs
    users bring); returns a JSON-ready summary."""
    specs = dict(specs or {})
    programs, methods = list(programs or (list(specs) or SUITE)), list(methods)
    check_choices(programs, methods, n, extra=specs)
    results = []
    for name in programs:
        results.append(benchmark_program(name, n=n, seed=seed, methods=methods, device=device, spec=specs.get(name)))
        if progress is not None:
            progress(results[-1])
    means = {m: {k: mean_over_programs(results, k, m) for k in AUROC_KEYS + FLOOR_KEYS} for m in methods}
    best = max(methods, key=lambda m: means[m]["edge_auroc"])
    best_floor = max(methods, key=lambda m: means[m]["edge_auroc_floor"])
    return {"programs": [r.__dict__ for r in results], "methods": list(methods), "means": means,
            "best_method": best, "best_mean_edge_auroc": means[best]["edge_auroc"],
            "best_method_floor": best_floor, "best_mean_edge_auroc_floor": means[best_floor]["edge_auroc_floor"],
            "floor": FLOOR, "n_examples": n, "seed": seed}
