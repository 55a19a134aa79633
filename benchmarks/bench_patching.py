"""Activation patching sweep: the batched sweep against the naive loop (one forward per patch).

A full head x position (`z_pos`) noising sweep with the counterfactual reference on IOI (positions are
the schema's spans), timed in one run: `patch_sweep` (patches batched, each layer's run starting from
the cached residual entering it), then the naive loop (`naive_sweep`: one full forward of one example
per patch, a plain hook) on a seeded random subsample of the patches, extrapolated to all of them;
both figures are printed. The subsample's values are checked against the batched sweep's. Last, the
attribution-patching estimate and its Spearman correlation with the exact sweep.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_patching.py [--model smollm2-135m] [--n 16]
        [--naive-sample 64] [--component z_pos] [--save DIR]

Ends with `ratio=<batched / naive>` (the naive time extrapolated when subsampled).
"""

from __future__ import annotations

import argparse
import time

import torch

import mechscope
from mechscope.patching import attribution_sweep, naive_sweep, patch_sweep, spearman
from mechscope.tasks import make_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--task", default="ioi")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--component", default="z_pos")
    ap.add_argument("--naive-sample", type=int, default=64, help="patches timed in the naive loop (0: all)")
    ap.add_argument("--patch-batch", type=int, default=256)
    ap.add_argument("--save", default=None, help="save the exact and estimated results here (result files)")
    args = ap.parse_args()

    model = mechscope.load_model(args.model, device="cpu")
    data = make_task(args.task, model.tokenizer, args.n, 0)
    print(f"model={args.model} task={args.task} n={args.n} component={args.component} "
          f"threads={torch.get_num_threads()} lengths={sorted({len(e) for e in data.examples})}")

    t = time.perf_counter()
    fast = patch_sweep(model, data, args.component, "noising", "counterfactual", patch_batch=args.patch_batch,
                       progress=False)
    t_fast = time.perf_counter() - t
    cells = torch.cartesian_prod(*[torch.arange(n) for n in fast.values.shape]).reshape(-1, fast.values.dim())
    n_patches = len(cells)
    print(f"batched sweep: {n_patches} patches in {t_fast:.1f} s ({1e3 * t_fast / n_patches:.2f} ms/patch)")

    if args.naive_sample and args.naive_sample < n_patches:
        g = torch.Generator().manual_seed(0)
        pick = cells[torch.randperm(n_patches, generator=g)[: args.naive_sample]]
    else:
        pick = cells
    t = time.perf_counter()
    slow = naive_sweep(model, data, args.component, "noising", "counterfactual", cells=[tuple(c) for c in pick.tolist()],
                       progress=False)
    t_naive_measured = time.perf_counter() - t
    # naive_sweep also runs each example's clean and counterfactual prompt once (the metric's ends): that
    # part is paid once per example, the rest once per patch.
    t = time.perf_counter()
    with torch.no_grad():
        for e in range(len(data)):
            b = data.batch([e])
            model(b.clean), model(b.counterfactual)
            model.run_with_cache(b.counterfactual)
    t_fixed = time.perf_counter() - t
    per_patch = max(t_naive_measured - t_fixed, 1e-9) / len(pick)
    t_naive = t_fixed + per_patch * n_patches
    got = fast.raw[tuple(pick.T)]
    want = slow.raw[tuple(pick.T)]
    print(f"naive loop: {len(pick)} patches measured in {t_naive_measured:.1f} s ({1e3 * per_patch:.1f} ms/patch "
          f"after {t_fixed:.1f} s of per-example runs); extrapolated to all {n_patches}: {t_naive:.1f} s")
    print(f"max |batched - naive| on the measured patches: {float((got - want).abs().max()):.2e} (raw metric)")

    t = time.perf_counter()
    est = attribution_sweep(model, data, args.component, "noising", "counterfactual")
    t_est = time.perf_counter() - t
    rho = spearman(fast.values, est.values)
    rho_mean = spearman(fast.mean, est.mean)
    print(f"attribution patching: {t_est:.1f} s; spearman(exact, estimate) per example-cell {rho:.3f}, "
          f"of the means {rho_mean:.3f}")
    if fast.axes[1:] == ("head", "position"):
        mean = fast.mean
        top = torch.topk(mean.abs().reshape(-1), 8).indices
        shape = mean.shape
        rows = []
        for flat in top.tolist():
            l, h, p = flat // (shape[1] * shape[2]), (flat // shape[2]) % shape[1], flat % shape[2]
            rows.append(f"a{l}.h{h}@{fast.labels[2][p]}={float(mean[l, h, p]):+.3f}")
        print("largest mean effects: " + ", ".join(rows))
    if args.save:
        fast.save(f"{args.save}/exact.safetensors")
        est.save(f"{args.save}/estimate.safetensors")
    print(f"ratio={t_fast / t_naive:.4f}")


if __name__ == "__main__":
    main()
