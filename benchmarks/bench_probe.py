"""Activations for every layer in one forward pass per batch (`probes.activations.collect` with all hook
points) against one forward pass per layer (collect with one hook point, which stops after that layer:
the per-layer loop a probe script would otherwise write), on the same texts at the same position.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_probe.py [--model smollm2-135m] [--n 200]
        [--batch-size B] [--device cpu|cuda] [--repeats 3]

Both ways are checked to return the same activations. Prints the best-of-repeats wall time of each and
ends with `ratio=<one pass / per layer>` (the issue's target is <= 0.1; with L layers and the early stop,
the per-layer loop costs about (L + 1) / 2 full passes, so the ratio's floor is about 2 / (L + 1)).
"""

from __future__ import annotations

import argparse
import time

import mechscope
from mechscope.devices import synchronize
from mechscope.probes.activations import collect, resid_points
from mechscope.probes.concepts import make_concept


def _timed(fn, repeats: int, device):
    best, out = float("inf"), None
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, default=200, help="texts (the sentiment concept set)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    model = mechscope.load_model(args.model, device=args.device)
    device = next(model.parameters()).device
    texts = make_concept("sentiment", model.tokenizer, n=args.n).texts
    points = resid_points(model)
    collect(model, texts[:8], points, batch_size=args.batch_size, progress=False)  # warm-up

    one, acts = _timed(lambda: collect(model, texts, points, batch_size=args.batch_size, progress=False),
                       args.repeats, device)

    def per_layer():
        return {p: collect(model, texts, [p], batch_size=args.batch_size, progress=False)[p] for p in points}

    loop, each = _timed(per_layer, args.repeats, device)
    worst = max(float((acts[p] - each[p]).abs().max()) for p in points)
    assert worst < 1e-4, f"the two ways disagree by {worst}"
    print(f"model={args.model} device={device} texts={len(texts)} layers={len(points)} position=last")
    print(f"one_pass_s={one:.3f}")
    print(f"per_layer_s={loop:.3f}")
    print(f"max_abs_diff={worst:.2e}")
    print(f"ratio={one / loop:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
