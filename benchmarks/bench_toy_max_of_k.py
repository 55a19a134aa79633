"""Max-of-K with compact proofs: train the paper's model (d_vocab 64, K 4, one attention-only layer),
prove its accuracy over all 64^4 = 16.7M inputs by brute force and by the three mechanism proofs, and
print each proof's bound, FLOPs and time as key=value lines; the bound-vs-cost figure goes to
docs/images/toy-max-of-k.png.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/bench_toy_max_of_k.py [--steps N] [--device cuda]

Acceptance: brute_force_bound == accuracy (the model's argmax accuracy over every input); some
mechanism proof with flops_ratio <= 0.01 and bound_ratio >= 0.9."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from mechscope.devices import resolve_device
from mechscope.toys.max_of_k import MaxOfKConfig, analyze, train

FIGURE = Path(__file__).resolve().parent.parent / "docs" / "images" / "toy-max-of-k.png"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    parser.add_argument("--figure", type=Path, default=FIGURE)
    args = parser.parse_args()
    config = MaxOfKConfig(seed=args.seed)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    device = resolve_device(args.device)
    start = time.perf_counter()
    trained = train(config, device=device, progress=False)
    print(f"device={device}")
    print(f"train_steps={config.steps}")
    print(f"train_seconds={time.perf_counter() - start:.1f}")
    print(f"sample_accuracy={trained.state.last('accuracy'):.5f}")
    result = analyze(trained, progress=False)
    summary = result.summary
    brute = result.proofs["brute_force"]
    print(f"inputs={brute.total}")
    print(f"accuracy={summary['argmax_accuracy']:.6f}")
    for name, proof in result.proofs.items():
        print(f"{name}_bound={proof.bound:.6f}")
        print(f"{name}_flops={proof.flops:.4g}")
        print(f"{name}_seconds={proof.seconds:.3f}")
        if name != "brute_force":
            print(f"{name}_flops_ratio={proof.flops / brute.flops:.3g}")
            print(f"{name}_bound_ratio={proof.bound / summary['argmax_accuracy']:.4f}")
    print(f"brute_force_equals_accuracy={brute.bound == summary['argmax_accuracy']}")
    cheap = [p for n, p in result.proofs.items() if n != "brute_force" and p.flops <= 0.01 * brute.flops]
    best = max(cheap, key=lambda p: p.bound)
    print(f"best_cheap_strategy={best.strategy}")
    print(f"acceptance_cheap={best.bound >= 0.9 * summary['argmax_accuracy']}")
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    result.figure(args.figure)
    print(f"figure={args.figure}")


if __name__ == "__main__":
    main()
