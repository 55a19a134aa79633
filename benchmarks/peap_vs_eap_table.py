"""Markdown tables of PEAP against EAP from `mechscope curves --methods peap,eap` result files (the
README's comparison): concrete edges needed per normalized faithfulness, areas, and curve points.

    .venv/bin/python benchmarks/peap_vs_eap_table.py results/*_peap_vs_eap.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from mechscope.circuits.evaluation import edges_to_reach


def reach(curve: dict, target: float, size: str = "concrete_edges") -> str:
    """Edges (`size`: all concrete edges, or `concrete_within`) needed to reach normalized faithfulness
    `target`; "<= x" where the smallest circuit already does."""
    points = [(p[size], p["normalized"]) for p in curve["points"]]
    value = edges_to_reach(points, target)
    if value is None:
        return "never"
    return f"{'<= ' if points[0][1] >= target else ''}{value:,.0f}"


def main(paths: list[str]) -> None:
    runs = [(Path(p).name.split("_")[0], json.loads(Path(p).read_text())) for p in paths]
    print("| task | held-out | method | f >= 0.5 | f >= 0.8 | f >= 0.9 | f >= 0.8, within-position edges only "
          "| CPR (concrete) | CMD (concrete) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for task, s in runs:
        for method, c in s["methods"].items():
            print(f"| {task} | {s['n_evaluation']} | {method.upper()} | {reach(c, 0.5)} | {reach(c, 0.8)} | "
                  f"{reach(c, 0.9)} | {reach(c, 0.8, 'concrete_within')} | {c['cpr_concrete']:.3f} | {c['cmd_concrete']:.3f} |")
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
