"""Faithfulness of circuits by exact edge ablation (docs/method.md §6).

The model runs on the clean prompt with every edge outside the circuit patched to its reference value.
  soft       F = mean M(C) / mean M(model)                          (PEAP)
  hard       fraction of examples whose argmax under C equals the model's argmax   (PEAP)
  normalized f = (mean M(C) - mean M(empty)) / (mean M(model) - mean M(empty))   (Hanna et al.; MIB)
Curves evaluate circuits at fractions of all edges; CPR is the area under f over the fraction axis
(trapezoid, higher is better) and CMD the area under |1 - f| (lower is better).

f divides by M(model) - M(empty). When that difference is small against its spread over examples
(|mean| below SIGNAL_SE standard errors of the per-example difference), f is mostly noise: `evaluate`
and `faithfulness_curve` then emit a `MechscopeWarning` (see `Faithfulness.weak_signal`).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .. import distributed
from ..devices import model_device, batch_size_for
from ..attribution.attention import attention_scale, check_supported, score_soft_cap
from ..attribution.peap import batch_span_of
from ..attribution.references import (
    attention_references,
    check_ablation,
    clean_pass,
    counterfactual_pass,
    mean_reference,
    reference_outputs,
    upstream_and_attention,
)
from ..attribution.runner import Ablation, AttentionAblation, check_ablatable, graph_hooks, run_to_final_logits
from ..behaviour import check_compatible
from .circuit import Circuit, circuit_from_greedy_order, greedy_order
from ..data.dataset import PromptPairDataset
from ..errors import MechscopeWarning, ParameterError, check_finite
from ..graph import Graph
from ..metrics import Metric, accuracy, check_metric_values, compute_metric, resolve_metric
from .span_circuit import (
    ALL_TOKENS,
    SpanCircuit,
    SpanGraphScores,
    circuit_from_order,
    span_greedy_order,
    span_top_order,
)

DEFAULT_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
SELECTIONS = ("top_n", "greedy")
SIGNAL_SE = 2.0  # |M(model) - M(empty)| below this many standard errors: normalized faithfulness is noise


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
    # Token-level edges the circuit stands for, averaged over the evaluation examples (docs/method.md §4):
    # within-position and crossing (inside attention) edges. A non-positional circuit keeps every
    # crossing edge of its live heads.
    concrete_edges: float | None = None
    concrete_within: float | None = None
    concrete_crossing: float | None = None
    # Standard error of the per-example difference M(model) - M(empty) over the evaluation examples
    # (NaN with one example): the noise of normalized faithfulness's denominator.
    gap_se: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def gap(self) -> float:
        """mean M(model) - mean M(empty): the denominator of normalized faithfulness."""
        return self.metric_model - self.metric_empty

    def weak_signal(self) -> str | None:
        """A message when the gap is zero or within SIGNAL_SE standard errors of zero (normalized
        faithfulness is then noise), else None."""
        se = self.gap_se if self.gap_se is not None and math.isfinite(self.gap_se) else None
        if self.gap == 0:
            why = "is zero"
        elif se is not None and abs(self.gap) < SIGNAL_SE * se:
            why = f"is within {SIGNAL_SE:g} standard errors ({SIGNAL_SE:g} x {se:.3g}) of zero"
        else:
            return None
        return (
            f"M(model) - M(all ablated) = {self.gap:.4g} {why} over {self.n_examples} examples: normalized "
            "faithfulness divides by noise and is not meaningful here (the model may not do the task, or the "
            "counterfactual does not change its answer); use more examples or another task, metric or ablation"
        )


def warn_weak_signal(result: "Faithfulness", stacklevel: int = 3) -> str | None:
    """Emit `weak_signal`'s message as a MechscopeWarning; returns it (None when the signal is clear)."""
    message = result.weak_signal()
    if message:
        warnings.warn(message, MechscopeWarning, stacklevel=stacklevel)
    return message


@dataclass
class _Totals:
    """Per-example sums accumulated over batches for one circuit."""

    metric: float = 0.0
    agree: float = 0.0
    correct: float = 0.0


def is_full(circuit: Circuit | SpanCircuit) -> bool:
    """Whether the circuit keeps every edge (a span circuit: every edge the full one has), so that it
    is the model itself."""
    if isinstance(circuit, Circuit):
        return bool(circuit.edges.all())
    full = SpanCircuit.full(circuit.graph, circuit.spans, circuit.logit_spans)
    return bool((circuit.within >= full.within).all()) and all(
        bool((circuit.crossing[k] >= part).all()) for k, part in full.crossing.items())


class _Evaluator:
    """Runs each batch's clean, reference and empty passes once and any number of circuits on it.

    With `shortcuts` (the default) runs whose result is known exactly are not run: a circuit that
    keeps every edge is the clean run, one that keeps none the all-ablated run, and with the counterfactual reference the all-ablated run is
    the counterfactual run (every node reads the counterfactual prompt's residual stream; its logits
    come from the reference pass). Its ablated passes also compute each correction from the nodes
    with non-zero weight only (`Ablation.sparse`). All of this equals the plain ablated passes to
    float rounding (tests/test_span_circuits.py runs them both ways)."""

    def __init__(self, model, dataset: PromptPairDataset, ablation: str, reference, batch_size: int,
                 metric: Metric | None = None, shortcuts: bool = True):
        check_ablation(ablation)
        check_compatible(model, dataset)
        check_ablatable(model)
        self.metric = resolve_metric(metric, dataset)
        self.model, self.dataset, self.ablation = model, dataset, ablation
        self.graph = Graph.from_model(model)
        self.batch_size = batch_size
        self.reference_set = reference or dataset
        self.shortcuts = shortcuts
        self._mean = None

    def mean(self, attention: bool):
        if self.ablation != "mean":
            return None
        if self._mean is None or (attention and self._mean.attention is None):
            self._mean = mean_reference(self.model, self.graph, self.reference_set, self.batch_size, attention)
        return self._mean

    @torch.no_grad()
    def run(self, circuits: Sequence[Circuit | SpanCircuit], progress: bool = True) -> list[Faithfulness]:
        model, graph, ds = self.model, self.graph, self.dataset
        device = model_device(model)
        totals = [_Totals() for _ in circuits]
        model_t, empty_t = _Totals(), _Totals()
        positional = any(isinstance(c, SpanCircuit) for c in circuits)
        if positional:
            check_supported(model)
        keeps = [c.keep_matrix().to(device) if isinstance(c, Circuit) else None for c in circuits]
        # One tensor per distinct span mapping, so that circuits with the same mapping share its layout.
        distinct: dict = {}
        maps = []
        for c in circuits:
            key = tuple(c.span_map(ds)) if isinstance(c, SpanCircuit) else None
            if key is not None and key not in distinct:
                distinct[key] = torch.tensor(list(key) + [-1], device=device)
            maps.append(distinct.get(key))
        mean = self.mean(positional)
        full = [is_full(c) for c in circuits]
        metric = self.metric
        gaps = []  # per-example M(model) - M(empty)
        # Data-parallel runs (distributed.py): each rank evaluates its shard; the sums are all-reduced.
        bar = tqdm(total=distributed.shard_size(len(ds)) * (len(circuits) + 1), desc="evaluating circuits", unit="run",
                   disable=not distributed.progress_enabled(progress))
        with distributed.together():
            for indices, batch in distributed.batches(ds, self.batch_size):
                batch = batch.to(device)
                # q, k, v are only needed to ablate crossing edges (span circuits).
                # One clean pass gives the upstream outputs, q/k/v and the logits at the last positions only
                # (with a large vocabulary, Gemma's 262k, unembedding every position dominates a pass).
                clean_up, clean_attn, clean = clean_pass(model, graph, batch, attention=positional)
                cf_logits = None
                if self.ablation == "counterfactual" and self.shortcuts:
                    reference, cf_attn, cf_logits = counterfactual_pass(model, graph, batch, attention=positional)
                elif self.ablation == "counterfactual" and positional:
                    reference, cf_attn = upstream_and_attention(model, graph, batch.counterfactual, batch.attention_mask)
                else:
                    reference, cf_attn = reference_outputs(model, graph, batch, self.ablation, clean_up, mean), None
                attn_ref = attention_references(model, graph, batch, self.ablation, clean_attn, mean, cf_attn) \
                    if positional else None
                span_of = batch_span_of(ds, indices, batch.clean.shape[1], device) if positional else None
                top = clean.argmax(-1)
                layouts: dict = {}  # per span mapping: tokens' spans, the reference sorted by span (shared)

                def score(ablation: Ablation | None, into: _Totals, run_name: str, logits=None):
                    if logits is None:
                        with graph_hooks(model, graph, ablation=ablation, attention_mask=batch.attention_mask,
                                         stop_at_final=True) as run:
                            logits = run_to_final_logits(model, run, batch.clean, batch.attention_mask, batch.last)
                    values = compute_metric(metric, logits, batch, clean_logits=clean).double()
                    check_metric_values(values, metric, run_name, ds, indices)
                    into.metric += float(values.sum())
                    into.agree += float((logits.argmax(-1) == top).sum())
                    into.correct += float(accuracy(logits, batch).sum())
                    return values, logits

                m_model = compute_metric(metric, clean, batch, clean_logits=clean).double()
                check_metric_values(m_model, metric, "the clean run", ds, indices)
                model_t.metric += float(m_model.sum())
                model_t.agree += len(top)
                model_t.correct += float(accuracy(clean, batch).sum())
                empty = None if cf_logits is not None else \
                    Ablation(torch.zeros(graph.n_upstream, graph.n_downstream, device=device), reference, sparse=self.shortcuts)
                m_empty, empty_logits = score(empty, empty_t, "the all-ablated run", cf_logits)
                gaps.append((m_model - m_empty).cpu())
                bar.update(len(top))
                for k, (c, keep, mapping, into) in enumerate(zip(circuits, keeps, maps, totals)):
                    run_name = f"the run of circuit {k} ({c.n_edges} edges)"
                    if self.shortcuts and full[k]:
                        score(None, into, run_name, clean)
                    elif self.shortcuts and c.n_edges == 0:  # keeps nothing: the all-ablated run
                        score(None, into, run_name, empty_logits)
                    elif keep is not None:
                        score(Ablation(keep, reference, sparse=self.shortcuts), into, run_name)
                    else:
                        shared = layouts.setdefault(id(mapping), {"span_of": mapping[span_of]})
                        within, (keep_k, keep_v, keep_q) = c.projection(shared["span_of"])
                        attention = AttentionAblation(
                            keep_k, keep_v, keep_q, attn_ref, attention_scale(model), score_soft_cap(model)
                        ) if keep_k else None
                        score(Ablation(within, reference, shared["span_of"], attention, sparse=self.shortcuts,
                                      layout=shared), into, run_name)
                    bar.update(len(top))
        bar.close()
        gap = torch.cat(gaps)
        if distributed.active():
            _reduce_totals([model_t, empty_t, *totals])
            gap = distributed.all_gather_cat(gap)
        n = len(ds)
        m_model, m_empty = model_t.metric / n, empty_t.metric / n
        gap_se = float(gap.std() / math.sqrt(n)) if n > 1 else float("nan")
        out = []
        for c, t in zip(circuits, totals):
            m_c = t.metric / n
            span_c = c if isinstance(c, SpanCircuit) else SpanCircuit.from_circuit(c)
            concrete = span_c.concrete_edges(ds)
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
                    concrete_edges=concrete["total"],
                    concrete_within=concrete["within"],
                    concrete_crossing=concrete["crossing"],
                    gap_se=gap_se,
                )
            )
        return out


def _reduce_totals(totals: list[_Totals]) -> None:
    """Replace each rank's sums by their sums over all ranks (one all-reduce)."""
    flat = distributed.sum_numbers(*(x for t in totals for x in (t.metric, t.agree, t.correct)))
    for k, t in enumerate(totals):
        t.metric, t.agree, t.correct = flat[3 * k: 3 * k + 3]


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else float("nan")


def evaluate(
    model,
    circuit: Circuit,
    dataset: PromptPairDataset,
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    metric: Metric | None = None,
) -> Faithfulness:
    """Soft, hard and normalized faithfulness of one circuit on `dataset`. `metric`: a name or a
    function fn(final logits [batch, vocab], batch) -> [batch]; default the dataset's. Warns
    (MechscopeWarning) when normalized faithfulness is noise (`Faithfulness.weak_signal`)."""
    batch_size = batch_size_for(model, batch_size)
    circuit.check_model(model)
    result = _Evaluator(model, dataset, ablation, reference, batch_size, metric).run([circuit], progress)[0]
    warn_weak_signal(result)
    return result


@dataclass(repr=False)
class Curve:
    method: str
    selection: str
    points: list[Faithfulness] = field(default_factory=list)
    # Concrete token-level edges of the whole model on the evaluation set (the same for positional
    # and non-positional circuits): the concrete-edge axis of the areas is a fraction of it.
    concrete_full: float | None = None
    # The circuits measured, one per point (kept by `faithfulness_curve(s)`, for reports that step
    # through them); None for a curve built without them.
    circuits: list | None = field(default=None, compare=False)

    @property
    def fractions(self) -> list[float]:
        return [p.fraction for p in self.points]

    @property
    def cpr(self) -> float:
        """Area under normalized faithfulness over the fraction-of-edges axis (trapezoid)."""
        return _trapezoid(self.fractions, [p.normalized for p in self.points])

    @property
    def cmd(self) -> float:
        """Area under |1 - normalized faithfulness| over the fraction-of-edges axis (trapezoid)."""
        return _trapezoid(self.fractions, [abs(1 - p.normalized) for p in self.points])

    @property
    def concrete_fractions(self) -> list[float]:
        return [p.concrete_edges / self.concrete_full for p in self.points]

    @property
    def cpr_concrete(self) -> float:
        """CPR over the fraction of concrete token-level edges (comparable across positional and
        non-positional circuits)."""
        return _trapezoid(self.concrete_fractions, [p.normalized for p in self.points])

    @property
    def cmd_concrete(self) -> float:
        """CMD over the fraction of concrete token-level edges."""
        return _trapezoid(self.concrete_fractions, [abs(1 - p.normalized) for p in self.points])

    def weak_signal(self) -> str | None:
        """The points' shared `Faithfulness.weak_signal` message (None when the signal is clear)."""
        return self.points[0].weak_signal() if self.points else None

    def __repr__(self) -> str:
        if not self.points:
            return f"Curve(method={self.method!r}, selection={self.selection!r}, no points)"
        f = [p.normalized for p in self.points]
        weak = ", weak signal" if self.weak_signal() else ""
        return (f"Curve(method={self.method!r}, selection={self.selection!r}, {len(self.points)} points, "
                f"cpr={self.cpr:.3f}, cmd={self.cmd:.3f}, normalized {min(f):.2f}..{max(f):.2f}{weak})")

    def edges_for(self, target: float) -> float | None:
        """Concrete edges at which normalized faithfulness first reaches `target` (see edges_to_reach)."""
        return edges_to_reach([(p.concrete_edges, p.normalized) for p in self.points], target)

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "selection": self.selection,
            "cpr": self.cpr,
            "cmd": self.cmd,
            "points": [p.to_dict() for p in self.points],
        }
        if self.concrete_full:
            out.update(concrete_full=self.concrete_full, cpr_concrete=self.cpr_concrete,
                       cmd_concrete=self.cmd_concrete)
        return out


def edges_to_reach(points: Sequence[tuple[float, float]], target: float) -> float | None:
    """The size x at which a curve of (size, faithfulness) points, sizes ascending, first reaches
    `target`: linear interpolation between points on a log size axis; the first size if the first point
    already reaches it; None if no point does."""
    for i, (x, y) in enumerate(points):
        if y >= target:
            if i == 0:
                return x
            x0, y0 = points[i - 1]
            w = (target - y0) / (y - y0)
            return float(math.exp(math.log(x0) + w * (math.log(x) - math.log(x0))))
    return None


def _trapezoid(x: Sequence[float], y: Sequence[float]) -> float:
    return float(sum((x[i + 1] - x[i]) * (y[i + 1] + y[i]) / 2 for i in range(len(x) - 1)))


def check_fractions(fractions: Sequence[float]) -> list[float]:
    """`fractions` as a list, or ParameterError unless they are increasing numbers in (0, 1], at least
    one: the circuit sizes of a curve, as fractions of all edges."""
    try:
        values = [float(f) for f in fractions]
    except (TypeError, ValueError):
        values = None
    if not values or any(isinstance(f, bool) for f in fractions) or any(not 0 < f <= 1 for f in values) \
            or any(a >= b for a, b in zip(values, values[1:])):
        raise ParameterError(f"fractions must be increasing numbers in (0, 1], got {fractions!r}")
    return values


def check_selection(selection: str) -> str:
    if selection not in SELECTIONS:
        raise ParameterError(f"unknown selection '{selection}'; choose {' or '.join(SELECTIONS)}")
    return selection


def check_scores_finite(scores) -> None:
    """NonFiniteError unless every score a circuit is selected by is finite."""
    hint = "circuits are selected by every edge's score (exact scores of a subset of edges leave the others NaN)"
    check_finite(scores.values, f"{scores.method} scores selecting the circuits", hint)
    for name, part in scores.crossing.items():
        check_finite(part, f"{scores.method} crossing-edge scores ({name}) selecting the circuits", hint)


def select_circuits(scores, fractions: Sequence[float], selection: str = "top_n", attention: str = "scored"):
    """Circuits of `fractions` x all edges of the scores' graph (the span graph for positional scores),
    chosen by `selection` (top_n | greedy). Positional circuits share one greedy order."""
    check_selection(selection)
    check_scores_finite(scores)
    if not scores.positional:
        n_total = scores.graph.n_edges
        budgets = [max(1, round(f * n_total)) for f in fractions]
        if selection == "top_n":
            return [scores.top_n(b) for b in budgets]
        order = greedy_order(scores, max(budgets))  # greedy circuits of growing budgets share one order
        return [circuit_from_greedy_order(scores, order[:b], b) for b in budgets]
    sg = SpanGraphScores(scores)
    n_total = sg.n_edges
    budgets = [max(1, round(f * n_total)) for f in fractions]
    partial = [b for b in budgets if b < n_total]
    order_of = span_greedy_order if selection == "greedy" else span_top_order
    order = order_of(sg, max(partial), attention) if partial else []
    out = []
    for b in budgets:
        if b >= n_total:
            out.append(SpanCircuit.full(scores.graph, sg.spans, sg.logit_spans, model=scores.model,
                                        method=scores.method, info={"selection": selection, "n": b, "metric": scores.metric}))
        else:
            out.append(circuit_from_order(sg, order[:b], attention, info={"selection": selection, "n": b}))
    return out


def faithfulness_curve(
    model,
    scores,
    dataset: PromptPairDataset,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    selection: str = "top_n",
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    attention: str = "scored",
    circuits: Sequence | None = None,
    metric: Metric | None = None,
) -> Curve:
    """Faithfulness of circuits of `fractions` x all edges, selected from `scores` by `selection`.

    Positional (PEAP) scores give span circuits over the span graph (within and crossing edges);
    `attention="whole"` keeps every crossing edge of the heads in the circuit instead of scoring them.
    `circuits`: the circuits already selected for `fractions` (by `select_circuits`), to keep them.
    `metric`: a name or a function fn(final logits [batch, vocab], batch) -> [batch]; default the
    dataset's. Warns (MechscopeWarning) when normalized faithfulness is noise (`Curve.weak_signal`)."""
    if circuits is None:
        circuits = select_circuits(scores, check_fractions(fractions), selection, attention)
    return faithfulness_curves(model, {scores.method: (scores, circuits)}, dataset, fractions, selection, ablation,
                               reference, batch_size, progress, metric)[scores.method]


def faithfulness_curves(
    model,
    selected: dict,
    dataset: PromptPairDataset,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    selection: str = "top_n",
    ablation: str = "counterfactual",
    reference: PromptPairDataset | None = None,
    batch_size: int | None = None,
    progress: bool = True,
    metric: Metric | None = None,
) -> dict[str, Curve]:
    """`faithfulness_curve` of several methods' circuits at once: `selected` maps a name to (scores,
    the circuits selected for `fractions`). The circuits share each batch's clean and reference
    passes, which a curve per method would run again. Returns a Curve per name."""
    batch_size = batch_size_for(model, batch_size)
    fractions = check_fractions(fractions)
    for scores, circuits in selected.values():
        if len(circuits) != len(fractions):
            raise ParameterError(f"{len(circuits)} circuits for {len(fractions)} fractions")
        for c in circuits:
            c.check_model(model)
    everything = [c for _, circuits in selected.values() for c in circuits]
    results = _Evaluator(model, dataset, ablation, reference, batch_size, metric).run(everything, progress)
    curves, start = {}, 0
    for name, (scores, circuits) in selected.items():
        points = results[start:start + len(circuits)]
        start += len(circuits)
        for f, r in zip(fractions, points):
            r.fraction = f
        full = SpanCircuit.full(scores.graph, (ALL_TOKENS,)).concrete_edges(dataset)["total"]
        curves[name] = Curve(method=scores.method, selection=selection, points=points, concrete_full=full,
                             circuits=list(circuits))
    if results:
        warn_weak_signal(results[0])
    return curves
