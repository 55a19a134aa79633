"""EAP attribution versus the raw transformers passes it is built on, in the same run.

The baseline is the plain transformers model (same weights, eager attention, no hooks) doing what EAP
needs at minimum: a clean forward with a backward of the metric to the activations (weights frozen),
and a counterfactual forward. EAP adds the graph hooks, per-head inputs and the score contraction.
Prints both wall times (medians of --repeats runs, the two interleaved), EAP's peak memory, and ends with `ratio=<eap/baseline>`.

    .venv/bin/python benchmarks/bench_attribution.py [--model smollm2-135m] [--batch 16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import mechscope
from mechscope.attribution.eap import batch_gradients_and_deltas, contract
from mechscope.graph import Graph
from mechscope.metrics import compute_metric, final_logits
from mechscope.models import load_hf, resolve_spec
from mechscope.tasks import make_task


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median wall times of a and b, run alternately so drifts in machine load hit both alike."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = mechscope.load_model(args.model, device="cpu")
    dataset = make_task("ioi", model.tokenizer, args.batch, seed=0)
    batch = dataset.batch()
    graph = Graph.from_model(model)
    _, location = resolve_spec(args.model)
    hf, _ = load_hf(location)
    hf.requires_grad_(False)

    def baseline():
        embed = hf.get_input_embeddings()(batch.clean).detach().requires_grad_(True)
        logits = hf(inputs_embeds=embed, attention_mask=batch.attention_mask).logits
        m = compute_metric(dataset.metric, final_logits(logits, batch.last), batch)
        torch.autograd.grad(m.sum(), embed)
        with torch.no_grad():
            hf(batch.counterfactual, attention_mask=batch.attention_mask)

    def eap():
        delta, grad = batch_gradients_and_deltas(model, graph, batch, dataset.metric, "eap")
        contract(graph, delta, grad)

    rss_before = peak_rss_gib()
    t_base, t_eap = timed_pair(baseline, eap, args.repeats)
    print(f"model={args.model} batch={args.batch} tokens/example<={batch.clean.shape[1]} edges={graph.n_edges}")
    print(f"baseline (transformers clean fwd+bwd, cf fwd): {t_base:.3f} s")
    print(f"eap attribution: {t_eap:.3f} s")
    print(f"peak_rss_gib={peak_rss_gib():.2f} (after model loads: {rss_before:.2f})")
    print(f"ratio={t_eap / t_base:.3f}")


if __name__ == "__main__":
    main()
