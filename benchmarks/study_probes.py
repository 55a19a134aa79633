"""The probe study on SmolLM2-135M: per-layer held-out accuracy of a linear probe, its control task and
selectivity, sparse probes, and CCS against the supervised probe, for the sentiment, number and truth
concepts (200 texts each, 70 / 30 split by contrast pair, last token, residual stream after each layer).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/study_probes.py [--model smollm2-135m] [--device cpu]
        [--concepts sentiment number truth] [--ccs-seeds 5] [--l2 1.0] [--figure docs/images/probe-layers.png]
        [--report DIR] [--json FILE]

Prints a table per concept, then `key=value` lines: per concept the best layer by accuracy, its accuracy
and selectivity, the best selectivity and its layer, and CCS (mean, min, max over seeds) at the best
layer beside the supervised probe's pair accuracy there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import mechscope
from mechscope.probes.concepts import CONCEPTS, make_concept
from mechscope.probes.study import probe_layers
from mechscope.report.sections.probes import probe_figure_png, section


def _table(summary: dict) -> str:
    keys = ["accuracy", "control_accuracy", "selectivity", "l1_accuracy", "topk_accuracy", "pair_accuracy",
            "ccs_mean", "ccs_min", "ccs_max"]
    lines = [f"## {summary['concept']} (behaviour: {summary['behaviour']})",
             "layer " + " ".join(f"{k[:12]:>12}" for k in keys)]
    for r in summary["rows"]:
        lines.append(f"{r['layer']:>5} " + " ".join(f"{r.get(k, float('nan')):>12.3f}" for k in keys))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--device", default=None)
    ap.add_argument("--concepts", nargs="+", default=list(CONCEPTS))
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--ccs-seeds", type=int, default=5)
    ap.add_argument("--l2", type=float, default=1.0, help="L2 strength of the linear and control probes")
    ap.add_argument("--figure", default="docs/images/probe-layers.png")
    ap.add_argument("--report", default=None, help="also write a report directory here")
    ap.add_argument("--json", default=None, help="also write the summaries here")
    args = ap.parse_args()

    model = mechscope.load_model(args.model, device=args.device)
    summaries = []
    for name in args.concepts:
        t0 = time.perf_counter()
        study = probe_layers(model, make_concept(name, model.tokenizer, n=args.n), ccs_seeds=args.ccs_seeds,
                             l2=args.l2, progress=False)
        s = study.summary()
        s["seconds"]["total"] = time.perf_counter() - t0
        summaries.append(s)
        print(_table(s), flush=True)
    png = probe_figure_png(summaries)
    if args.figure:
        Path(args.figure).parent.mkdir(parents=True, exist_ok=True)
        Path(args.figure).write_bytes(png)
    if args.json:
        Path(args.json).write_text(json.dumps(summaries, indent=1))
    if args.report:
        from mechscope.report import write_sections

        write_sections(args.report, f"Probes on {args.model}", [section(summaries, png)],
                       {"summary.json": lambda p: p.write_text(json.dumps(summaries, indent=1))})
    for s in summaries:
        c, rows = s["concept"], s["rows"]
        best = max(rows, key=lambda r: r["accuracy"])
        sel = max(rows, key=lambda r: r["selectivity"])
        print(f"{c}_best_layer={best['layer']}")
        print(f"{c}_best_accuracy={best['accuracy']:.3f}")
        print(f"{c}_selectivity_at_best={best['selectivity']:.3f}")
        print(f"{c}_max_selectivity={sel['selectivity']:.3f}")
        print(f"{c}_max_selectivity_layer={sel['layer']}")
        if "ccs_mean" in best:
            print(f"{c}_probe_pair_accuracy_at_best={best['pair_accuracy']:.3f}")
            print(f"{c}_ccs_at_best={best['ccs_mean']:.3f} (min {best['ccs_min']:.3f}, max {best['ccs_max']:.3f})")
            top = max(rows, key=lambda r: r["ccs_mean"])
            print(f"{c}_ccs_best_layer={top['layer']} ccs={top['ccs_mean']:.3f}")
        if s["behaviour"]:
            b = s["behaviour"]
            print(f"{c}_behaviour_mean_logit_diff={b['mean_score']:.3f}"
                  + (f" accuracy={b['accuracy']:.3f}" if b["accuracy"] is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
