"""How PEAP's token-level scores become span-level ones (docs/method.md §4).

A span edge has instances in each example: a within-position edge one per token of its span (the
logits edge one, at the example's last token, when that token is in the span), a crossing key, value
or (per-key) query edge one per causal pair (t', t) of its key span and query span, a whole-row query
edge one per token of its span. The aggregations:

* `sum` (default): the sum over all instances of all examples divided by the number of examples N;
  summed over spans it is the EAP score.
* `avg`: per example the mean over its instances, then the mean over the examples that have at least
  one instance (the PEAP authors' default).
* `max_abs`: per example the largest |score| among its instances, then the mean over the examples that
  have at least one instance. Always >= 0.
* `pooled_mean`: the sum over all instances divided by the number of instances, over all examples
  pooled. Equal to `avg` when every example has the same number of instances of the edge; otherwise
  long examples weigh more in `pooled_mean` and every example weighs the same in `avg`.
* `signed_max`: the single instance of largest magnitude over all examples, with its sign.

Examples without an instance of a span edge (an empty span, a key span after the query span, the
logits edge of a span not holding the example's last token) do not count in that edge's `avg` or
`max_abs`; an edge with no instance in any example scores 0. `mean` and `max` were the names of
`pooled_mean` and `signed_max`; they are refused with the new name, because `mean` reads like `avg`
and `max` like `max_abs`.

`sum`, `pooled_mean` and `signed_max` are computed in `attribute` itself; `PerExample` accumulates
`avg` and `max_abs`, which need each example's span sums, instance counts or maxima before the mean
over examples.
"""

from __future__ import annotations

import torch

from ..devices import HOST
from ..errors import ParameterError
from ..graph import Graph
from .eap import contract, span_runs
from .peap import pair_kinds, span_one_hot

AGGREGATIONS = ("sum", "avg", "max_abs", "pooled_mean", "signed_max")
PER_EXAMPLE = ("avg", "max_abs")
RENAMED = {"mean": "pooled_mean", "max": "signed_max"}


def check_aggregation(aggregation: str, method: str) -> str:
    """ParameterError unless `aggregation` is one of AGGREGATIONS and applies to `method`."""
    choices = ", ".join(AGGREGATIONS)
    if aggregation in RENAMED:
        raise ParameterError(f"aggregation '{aggregation}' is now called '{RENAMED[aggregation]}' (the "
                             f"per-example forms are 'avg' and 'max_abs'); choose one of {choices}")
    if aggregation not in AGGREGATIONS:
        raise ParameterError(f"unknown aggregation '{aggregation}'; choose one of {choices}")
    if aggregation != "sum" and method != "peap":
        raise ParameterError("aggregation applies to peap's span-level scores only")
    return aggregation


def example_instances(span_of: torch.Tensor, last: torch.Tensor, n_spans: int) -> dict[str, torch.Tensor]:
    """Instances of a span edge in each example of a batch: tokens [b, S] (within-position and
    whole-row query edges), last [b, S] (1 where the example's last token, which the logits read, is in the span),
    pairs [b, S', S] (causal pairs (t', t), t' in key span S', t in query span S)."""
    onehot = span_one_hot(span_of, n_spans)  # [b, t, S]
    width = span_of.shape[1]
    causal = torch.ones(width, width, dtype=onehot.dtype, device=onehot.device).tril()  # [t, t']
    rows = torch.arange(len(last), device=onehot.device)
    return {"tokens": onehot.sum(1), "last": onehot[rows, last.to(onehot.device)],
            "pairs": torch.einsum("bjk,tj,btq->bkq", onehot, causal, onehot)}


def _mean_where(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count, and 0 where count is 0."""
    count = count.to(total.dtype)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


class PerExample:
    """Accumulates `avg` or `max_abs` span-level scores over batches (see the module docstring).

    `add` takes one batch's within-position factors (delta [n_up, b, t, d], grad [n_down, b, t, d]),
    its token-level crossing scores (k, v, q [b, L, H, t, t']; whole-row q [b, L, H, t]), span ids [b, t] and last
    positions [b]; `result` gives within [S, n_edges] and crossing scores, float64 on the host.
    """

    def __init__(self, aggregation: str, graph: Graph, n_spans: int, chunk: int = 32):
        if aggregation not in PER_EXAMPLE:
            raise ParameterError(f"per-example aggregation is one of {', '.join(PER_EXAMPLE)}, not '{aggregation}'")
        self.aggregation, self.graph, self.n_spans, self.chunk = aggregation, graph, n_spans, chunk
        self.within = None  # [S, n_up, n_down], on the model's device
        self.crossing: dict[str, torch.Tensor] = {}
        # examples with at least one instance: within / whole-row query edges, logits edges, crossing pairs
        self.n_tokens = torch.zeros(n_spans, dtype=torch.float64, device=HOST)
        self.n_last = torch.zeros(n_spans, dtype=torch.float64, device=HOST)
        self.n_pairs = torch.zeros(n_spans, n_spans, dtype=torch.float64, device=HOST)

    def add(self, delta: torch.Tensor, grad: torch.Tensor, crossing: dict[str, torch.Tensor],
            span_of: torch.Tensor, last: torch.Tensor) -> None:
        counts = example_instances(span_of, last, self.n_spans)
        self.n_tokens += (counts["tokens"] > 0).sum(0).double().cpu()
        self.n_last += counts["last"].sum(0).double().cpu()
        self.n_pairs += (counts["pairs"] > 0).sum(0).double().cpu()
        if self.aggregation == "avg":
            within = self._within_avg(delta, grad, span_of, last, counts)
            part = self._crossing_avg(crossing, span_of, counts)
        else:
            within = self._within_max_abs(delta, grad, span_of)
            part = self._crossing_max_abs(crossing, span_of)
        self.within = within if self.within is None else self.within + within
        self.crossing = {k: self.crossing[k] + v if k in self.crossing else v for k, v in part.items()}

    def result(self) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        g = self.graph
        within = self.within.double().cpu()[:, g.edge_up, g.edge_down]  # [S, E]
        per_edge = self.n_tokens[:, None].expand(-1, g.n_edges).clone()
        per_edge[:, g.edge_down == g.logits_index] = self.n_last[:, None]
        crossing = {k: v.double().cpu() for k, v in self.crossing.items()}
        return _mean_where(within, per_edge), {
            kind: _mean_where(x, self.n_pairs if x.dim() == 4 else self.n_tokens) for kind, x in crossing.items()
        }

    # -- avg: each example's instances weighted by 1 / (its instances of the edge)

    def _within_avg(self, delta, grad, span_of, last, counts) -> torch.Tensor:
        g = self.graph
        real = span_of >= 0
        size = counts["tokens"].gather(1, span_of.clamp(min=0))  # [b, t]: |S| of each token's span
        weight = torch.where(real, 1.0 / size.clamp(min=1), torch.zeros_like(size)).to(delta.dtype)
        out = contract(g, delta * weight[None, :, :, None], grad, span_of, self.n_spans).double()
        # The logits edge has one instance per example (its last token), which keeps weight 1.
        rows = torch.arange(len(last), device=delta.device)
        last = last.to(delta.device)
        at_last = torch.einsum("ubd,bd->bu", delta[:, rows, last], grad[g.logits_index, rows, last]).double()
        column = counts["last"].to(at_last.device).T @ at_last  # [S, n_up]
        out[:, :, g.logits_index] = column * g.edge_mask[:, g.logits_index].to(column.device, column.dtype)
        return out

    def _crossing_avg(self, scores, span_of, counts) -> dict[str, torch.Tensor]:
        onehot = span_one_hot(span_of, self.n_spans)  # [b, t, S]
        pairs, tokens = counts["pairs"][:, None, None], counts["tokens"][:, None, None]
        out = {kind: _mean_where(torch.einsum("bjk,blhtj,btq->blhkq", onehot, scores[kind], onehot), pairs).sum(0)
               for kind in pair_kinds(scores, 5)}
        if "q" not in out:  # whole-row query edges
            out["q"] = _mean_where(torch.einsum("blht,btq->blhq", scores["q"], onehot), tokens).sum(0)
        return out

    # -- max_abs: each example's largest |instance| (0 where it has none, which does not count)

    def _within_max_abs(self, delta, grad, span_of) -> torch.Tensor:
        g = self.graph
        out = torch.zeros(self.n_spans, delta.shape[0], grad.shape[0], dtype=torch.float64, device=delta.device)
        for b, row in enumerate(span_of.tolist()):
            for s, start, end in span_runs(row):
                best = None
                for a in range(start, end, self.chunk):
                    e = min(end, a + self.chunk)
                    prod = torch.bmm(delta[:, b, a:e].transpose(0, 1), grad[:, b, a:e].permute(1, 2, 0))  # [n, u, v]
                    top = prod.abs().amax(0)
                    best = top if best is None else torch.maximum(best, top)
                out[s] += best.double()
        # The logits' product is 0 away from the last token: a span without it adds 0 and is not counted.
        return out * g.edge_mask.to(out.device, out.dtype)

    def _crossing_max_abs(self, scores, span_of) -> dict[str, torch.Tensor]:
        L, H = scores["q"].shape[1:3]
        n, dev = self.n_spans, scores["q"].device
        kinds = pair_kinds(scores, 5)
        out = {kind: torch.zeros(L, H, n, n, dtype=torch.float64, device=dev) for kind in kinds}
        if "q" not in kinds:  # whole-row query edges
            out["q"] = torch.zeros(L, H, n, dtype=torch.float64, device=dev)
        size = {kind: scores[kind].abs() for kind in ("k", "v", "q")}
        for s in range(n):
            query = span_of == s  # [b, t]
            if not bool(query.any()):
                continue
            if "q" not in kinds:
                out["q"][:, :, s] = size["q"].masked_fill(~query[:, None, None, :], 0.0).amax(-1).sum(0)
            for a in range(s + 1):
                pair = query[:, :, None] & (span_of == a)[:, None, :]  # [b, t, t']
                if not bool(pair.any()):
                    continue
                for kind in kinds:  # scores are 0 outside t' <= t, so a masked 0 never wins
                    out[kind][:, :, a, s] = size[kind].masked_fill(~pair[:, None, None], 0.0).amax((-2, -1)).sum(0)
        return out
