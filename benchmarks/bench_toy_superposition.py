"""Superposition toy (Elhage et al. 2022), full training: 20 features, 5 dimensions, importance 0.9^i,
seven sparsities from S = 0 to S = 0.999, three instances each, 10,000 Adam steps of 1024 inputs, all
trained at once as one batched model; then the analysis and its figures.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_toy_superposition.py [--device cpu] [--steps N]
        [--out DIR] [--report DIR] [--figure docs/images/toy-superposition.png]

Prints one `key=value` line per figure: the training time, and the acceptance figures, which are
checked (exit status 1 when one fails): at S = 0 exactly the m most important features have norm > 0.5
with mutual |cos| < 0.1; at the sparsest S more than m features have norm > 0.5.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from mechscope.devices import resolve_device, synchronize
from mechscope.report.write import write_sections
from mechscope.toys.superposition import SuperpositionConfig, analyze, load, train


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    ap.add_argument("--steps", type=int, default=SuperpositionConfig.steps)
    ap.add_argument("--seed", type=int, default=SuperpositionConfig.seed)
    ap.add_argument("--out", default=None, help="checkpoint directory (default: a temporary one)")
    ap.add_argument("--report", default=None, help="also write the report directory here")
    ap.add_argument("--figure", default=None, help="copy the phase figure (PNG) here")
    args = ap.parse_args()

    device = resolve_device(args.device)
    config = SuperpositionConfig(steps=args.steps, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp) / "superposition"
        start = time.perf_counter()
        trained = train(config, out=out, device=device, progress=False)
        synchronize(device)
        seconds = time.perf_counter() - start
        trained = load(out, device=device)  # what was saved is what is analysed
    analysis = analyze(trained)
    s, m = analysis.summary, config.d_hidden

    print(f"device={device}")
    print(f"instances={config.n_instances}")
    print(f"steps={trained.state.step}")
    print(f"train_seconds={seconds:.1f}")
    for r in analysis.rows:
        print(f"stored[S={r['sparsity']:g}]={r['n_stored']} max_abs_cos={r['max_abs_cos']:.3f} "
              f"antipodal_pairs={len(r['antipodal_pairs'])} sum_D={r['sum_dimensionality']:.2f} loss={r['loss']:.3g}")
    print(f"dense_n_stored={s['dense_n_stored']}")
    print(f"dense_stored={','.join(map(str, analysis.rows[0]['stored']))}")
    print(f"dense_top_m={s['dense_top_m']}")
    print(f"dense_max_abs_cos={s['dense_max_abs_cos']:.4f}")
    print(f"sparsest_sparsity={s['sparsest_sparsity']:g}")
    print(f"sparsest_n_stored={s['sparsest_n_stored']}")
    print(f"sparsest_antipodal_pairs={s['sparsest_antipodal_pairs']}")
    ok = s["dense_top_m"] and s["dense_max_abs_cos"] < 0.1 and s["sparsest_n_stored"] > m
    print(f"acceptance={'pass' if ok else 'FAIL'}")

    if args.report:
        files = {"analysis.json": lambda p: p.write_text(json.dumps(s, indent=1)), **analysis.files()}
        write_sections(args.report, "mechscope toy: superposition", analysis.sections(), files, overwrite=True)
    if args.figure:
        Path(args.figure).write_bytes(analysis.figures()["superposition-phase.png"])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
