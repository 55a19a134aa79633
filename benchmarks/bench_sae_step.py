"""One TopK SAE training step (loss + backward + optimizer step), dense path against sparse path.

The SAE is the size bench_sae.py trains on SmolLM2 (d_in 576, d_sae 4608 = 8x, k 32) and a batch of
n = 1016 positions (8 sequences x 127). Activations are random (seeded); a step is what
dictionaries.train does per batch: architectures.loss, backward, the decoder-gradient projection,
gradient clipping, Adam, decoder renormalisation. Dense and sparse steps alternate (so load on a shared
machine hits both alike); each is timed over --repeats steps after --warmup, and the median is reported.
With --dead F a random fraction F of the latents is marked dead, so AuxK runs too (0: AuxK off).

Run (from the repository root):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_sae_step.py [--repeats 10] [--dead 0.1]

Prints key=value lines and ends with `ratio=<dense step time / sparse step time>` (of the --dead setting).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mechscope.dictionaries import Dictionary, DictionaryConfig
from mechscope.dictionaries.architectures import loss
from mechscope.dictionaries.training import normalize_decoder, remove_parallel_gradient


def one_step(sae, optimizer, x, dead, sparse: bool) -> float:
    start = time.perf_counter()
    parts = loss(sae, x, None, dead, sparse=sparse)
    optimizer.zero_grad(set_to_none=True)
    parts.loss.backward()
    remove_parallel_gradient(sae)
    torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
    optimizer.step()
    with torch.no_grad():
        normalize_decoder(sae)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-in", type=int, default=576)
    ap.add_argument("--d-sae", type=int, default=4608)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--n", type=int, default=1016)
    ap.add_argument("--dead", type=float, default=0.0, help="fraction of latents marked dead (AuxK on if > 0)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args()

    config = DictionaryConfig(architecture="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k,
                              hook_point="blocks.15.hook_resid_post")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.n, args.d_in, generator=gen)
    dead = torch.rand(args.d_sae, generator=gen) < args.dead
    saes, optimizers = {}, {}
    for sparse in (False, True):
        saes[sparse] = Dictionary(config).init_weights(0).train()
        optimizers[sparse] = torch.optim.Adam(saes[sparse].parameters(), lr=2e-4)
    times = {False: [], True: []}
    for i in range(args.warmup + args.repeats):
        for sparse in (False, True):
            t = one_step(saes[sparse], optimizers[sparse], x, dead, sparse)
            if i >= args.warmup:
                times[sparse].append(t)
    dense, sparse = statistics.median(times[False]), statistics.median(times[True])
    drift = max(float((saes[True].state_dict()[n] - p).abs().max()) for n, p in saes[False].state_dict().items())
    print(f"threads={torch.get_num_threads()} d_in={args.d_in} d_sae={args.d_sae} k={args.k} n={args.n} "
          f"dead={int(dead.sum())} repeats={args.repeats}")
    print(f"dense_step_s={dense:.4f}")
    print(f"sparse_step_s={sparse:.4f}")
    print(f"max_param_difference_after_{args.warmup + args.repeats}_steps={drift:.2e}")
    print(f"ratio={dense / sparse:.2f}")


if __name__ == "__main__":
    main()
