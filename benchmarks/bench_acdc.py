"""ACDC on a real model, on a part of its graph, beside EAP and EAP-IG circuits of the same size.

The whole graph of SmolLM2-135M has ~32k edges: one ACDC pass would take one ablated run per edge,
hours on two CPU cores. So ACDC may prune only the edges INTO the logits and into the downstream nodes
(q, k, v and MLP inputs) of the last K layers (`--last-layers`, default 0: the logits alone); every other
edge stays in every circuit. For each tau the script prints the edges tested (forwards, one run over
the examples each), wall time, the candidate edges kept, and the normalized faithfulness of the
circuit (the task's metric, counterfactual ablation, the same examples); then the EAP and EAP-IG
circuits with as many candidate edges: every non-candidate edge plus the top-|score| candidates,
scored on the same examples (non-positional PEAP is EAP: its scores summed over positions are EAP's).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_acdc.py [--tasks ioi,greater-than] [--n 16]
        [--taus 0.001,0.01,0.03] [--last-layers 0] [--from-layers M] [--metric kl]

On two shared CPU cores an ablated SmolLM2 run of 8 IOI prompts takes ~4 s, so the recorded run
restricts the candidates further (--from-layers 3: the 30 edges into the logits from the heads and
MLPs of layers 27-29).
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope
from mechscope.attribution import attribute
from mechscope.circuits.acdc import acdc, last_layers
from mechscope.circuits.circuit import Circuit
from mechscope.circuits.evaluation import _Evaluator
from mechscope.graph import Graph
from mechscope.tasks import make_task


def top_within(scores: torch.Tensor, candidates: torch.Tensor, n: int) -> torch.Tensor:
    """Every non-candidate edge plus the n candidates of largest |score|."""
    index = candidates.nonzero().flatten()
    s = scores[index].abs().nan_to_num(nan=-1.0)
    edges = ~candidates
    edges[index[s.argsort(descending=True, stable=True)[:n]]] = True
    return edges


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default="ioi,greater-than")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--taus", default="0.001,0.01,0.03")
    ap.add_argument("--last-layers", type=int, default=0)
    ap.add_argument("--from-layers", type=int, default=None,
                    help="Only candidate edges whose upstream node (head or MLP) is in the last M layers.")
    ap.add_argument("--metric", default="kl")
    ap.add_argument("--batch-size", type=int, default=16)
    args = ap.parse_args()
    taus = [float(t) for t in args.taus.split(",")]
    model = mechscope.load_model(args.model, device="cpu")
    graph = Graph.from_model(model)
    candidates = last_layers(graph, args.last_layers)
    if args.from_layers is not None:
        candidates &= graph.edge_up >= graph.head_index(graph.n_layers - args.from_layers, 0)
    n_cand = int(candidates.sum())
    print(f"model {args.model}: {graph.n_edges} edges; ACDC may prune the {n_cand} edges into the logits"
          + (f" and the inputs of the last {args.last_layers} layer(s)" if args.last_layers else "")
          + (f" from the heads and MLPs of the last {args.from_layers} layers" if args.from_layers else "")
          + f"; metric {args.metric}; {args.n} examples; torch threads {torch.get_num_threads()}")
    for task in args.tasks.split(","):
        dataset = make_task(task, model.tokenizer, args.n, seed=0)
        start = time.perf_counter()
        result = acdc(model, dataset, taus, metric=args.metric, candidates=candidates, batch_size=args.batch_size,
                      progress=False)
        acdc_total = time.perf_counter() - start
        print(f"\n{task}: ACDC in {acdc_total:.0f} s (incl. the clean / reference passes and the evaluation)")
        print(f"{'tau':>8} {'tested':>7} {'seconds':>8} {'kept':>6} {'normalized':>10}")
        for i, tau in enumerate(taus):
            kept = int((result.circuits[i].edges & candidates).sum())
            f = result.faithfulness[i]
            print(f"{tau:>8g} {result.n_forwards[i]:>7} {result.seconds[i]:>8.1f} {kept:>6} {f.normalized:>10.3f}")
        sizes = sorted({int((c.edges & candidates).sum()) for c in result.circuits})
        circuits, labels = [], []
        for method in ("eap", "eap-ig"):
            start = time.perf_counter()
            scores = attribute(model, dataset, method, batch_size=args.batch_size, progress=False).values
            seconds = time.perf_counter() - start
            for k in sizes:
                circuits.append(Circuit(graph, top_within(scores, candidates, k), method=method))
                labels.append((method, k, seconds))
        points = _Evaluator(model, dataset, "counterfactual", None, args.batch_size).run(circuits, progress=False)
        print(f"{'method':>8} {'kept':>6} {'normalized':>10}  (scores in s)")
        for (method, k, seconds), p in zip(labels, points):
            print(f"{method:>8} {k:>6} {p.normalized:>10.3f}  {seconds:.1f}")
        p0 = points[0]
        print(f"M(model) {p0.metric_model:.3f}, M(all ablated) {p0.metric_empty:.3f}, model accuracy "
              f"{p0.model_accuracy:.2f}")


if __name__ == "__main__":
    main()
