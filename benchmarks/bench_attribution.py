"""EAP attribution versus the raw transformers passes it is built on, in the same run.

The baseline is the plain transformers model (same weights, eager attention, no hooks) doing what EAP
needs at minimum: a clean forward with a backward of the metric to the activations (weights frozen),
and a counterfactual forward. EAP adds the graph hooks, per-head inputs and the score contraction.
Prints both wall times (medians of --repeats runs, the two interleaved; on a GPU each run ends with a
synchronisation so the clock sees the work), the peak memory (host RSS, and the GPU's peak allocation on
CUDA), and ends with `ratio=<eap/baseline>`.

    .venv/bin/python benchmarks/bench_attribution.py [--model smollm2-135m] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

import mechscope
from mechscope.attribution.eap import batch_gradients_and_deltas, contract
from mechscope.devices import resolve_device, synchronize
from mechscope.graph import Graph
from mechscope.metrics import compute_metric, final_logits
from mechscope.models import load_hf, resolve_spec
from mechscope.tasks import make_task


def device_name(device) -> str:
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed_pair(a, b, repeats: int, device="cpu") -> tuple[float, float]:
    """Median wall times of a and b, run alternately so drifts in machine load hit both alike."""
    a(), b()  # warm-up
    synchronize(device)
    ta, tb = [], []
    for _ in range(repeats):
        for fn, times in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def memory_line(device, rss_before: float) -> str:
    line = f"peak_rss_gib={peak_rss_gib():.2f} (after model loads: {rss_before:.2f})"
    if torch.device(device).type == "cuda":
        line += f" peak_gpu_gib={torch.cuda.max_memory_allocated(device) / 2**30:.2f}"
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    model = mechscope.load_model(args.model, device=device)
    dataset = make_task("ioi", model.tokenizer, args.batch, seed=0)
    batch = dataset.batch().to(device)
    graph = Graph.from_model(model)
    _, location = resolve_spec(args.model)
    hf, _ = load_hf(location)
    hf.requires_grad_(False)
    hf.to(device)

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

    def bridge_passes():
        # The same passes through the TransformerBridge with no graph hooks: how much of EAP's cost is
        # the bridge itself rather than mechscope's hooks and contraction.
        point = {}

        def leaf(value, hook):
            point["e"] = value.detach().requires_grad_(True)
            return point["e"]

        with model.hooks(fwd_hooks=[("hook_embed", leaf)]):
            logits = model(batch.clean, attention_mask=batch.attention_mask)
        m = compute_metric(dataset.metric, final_logits(logits, batch.last), batch)
        torch.autograd.grad(m.sum(), point["e"])
        with torch.no_grad():
            model(batch.counterfactual, attention_mask=batch.attention_mask)

    rss_before = peak_rss_gib()
    t_base, t_eap = timed_pair(baseline, eap, args.repeats, device)
    _, t_bridge = timed_pair(baseline, bridge_passes, args.repeats, device)
    print(f"model={args.model} device={device_name(device)} batch={args.batch} "
          f"tokens/example<={batch.clean.shape[1]} edges={graph.n_edges}")
    print(f"baseline (transformers clean fwd+bwd, cf fwd): {t_base:.3f} s")
    print(f"eap attribution: {t_eap:.3f} s")
    print(f"the same passes through the TransformerBridge, no graph hooks: {t_bridge:.3f} s "
          f"(bridge/baseline {t_bridge / t_base:.2f})")
    print(memory_line(device, rss_before))
    print(f"ratio={t_eap / t_base:.3f}")


if __name__ == "__main__":
    main()
