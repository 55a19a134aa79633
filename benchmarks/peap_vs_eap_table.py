"""Markdown tables of PEAP against EAP from `mechscope curves --methods peap,eap` result files (the
README's comparison): concrete edges needed per normalized faithfulness, areas, and curve points.

    .venv/bin/python benchmarks/peap_vs_eap_table.py results/*_peap_vs_eap.json
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path


def reach(curve: dict, target: str) -> str:
    value = curve["concrete_edges_for"][target]
    if value is None:
        return "never"
    first = curve["points"][0]
    prefix = "<= " if first["normalized"] >= float(target) and abs(value - first["concrete_edges"]) < 1e-6 else ""
    return f"{prefix}{value:,.0f}"


def reach_within(curve: dict, target: float) -> str:
    """Like the `concrete_edges_for` figures, on the within-position edge count alone."""
    pts = [(p["concrete_within"], p["normalized"]) for p in curve["points"]]
    for i, (x, y) in enumerate(pts):
        if y >= target:
            if i == 0:
                return f"<= {x:,.0f}"
            x0, y0 = pts[i - 1]
            w = (target - y0) / (y - y0)
            return f"{math.exp(math.log(x0) + w * (math.log(x) - math.log(x0))):,.0f}"
    return "never"


def main(paths: list[str]) -> None:
    runs = [(Path(p).name.split("_")[0], json.loads(Path(p).read_text())) for p in paths]
    print("| task | held-out | method | f >= 0.5 | f >= 0.8 | f >= 0.9 | f >= 0.8, within-position edges only "
          "| CPR (concrete) | CMD (concrete) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, s in runs:
        for method, c in s["methods"].items():
            print(f"| {task} | {s['n_evaluation']} | {method.upper()} | {reach(c, '0.5')} | {reach(c, '0.8')} | "
                  f"{reach(c, '0.9')} | {reach_within(c, 0.8)} | {c['cpr_concrete']:.3f} | {c['cmd_concrete']:.3f} |")
    print()
    fractions = next(iter(runs[0][1]["methods"].values()))["points"]
    print("| task | method | " + " | ".join(f"{100 * p['fraction']:g}%" for p in fractions) + " |")
    print("|---|---|" + "---|" * len(fractions))
    for task, s in runs:
        for method, c in s["methods"].items():
            cells = [f"{p['normalized']:.2f} / {p['concrete_edges'] / 1000:.1f}k" for p in c["points"]]
            print(f"| {task} | {method.upper()} | " + " | ".join(cells) + " |")
    print()
    for task, s in runs:
        b = s["behaviour"]
        print(f"{task}: model accuracy {b['model_accuracy']:.2f}, metric clean {b['metric_clean']:.3f}, "
              f"counterfactual {b['metric_counterfactual']:.3f}, kept {s['n_kept']} of {s['n_examples']}")


if __name__ == "__main__":
    main(sys.argv[1:])
