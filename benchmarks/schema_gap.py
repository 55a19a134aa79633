"""PEAP with an induced schema against PEAP with the hand-written one (issue 7): normalized
faithfulness of the induced-schema curve at each concrete edge count of the hand-written curve
(log-linear interpolation), and the gap. Inputs are `mechscope curves --methods peap` files made with
the same examples and seed.

    .venv/bin/python benchmarks/schema_gap.py HAND.json INDUCED.json [TASK]
"""

from __future__ import annotations

import json
import math
import sys


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """y at x on the piecewise log-linear curve through `points` (x ascending), None outside it."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x0 <= x <= x1 and x0 > 0:
            w = 0.0 if x1 == x0 else (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def main(hand_path: str, induced_path: str, task: str = "") -> None:
    hand, induced = (json.loads(open(p).read()) for p in (hand_path, induced_path))
    h = hand["methods"]["peap"]["points"]
    ind = [(p["concrete_edges"], p["normalized"]) for p in induced["methods"]["peap"]["points"] if p["concrete_edges"] > 0]
    gaps = []
    print(f"{task}: hand-written schema vs induced schema (normalized faithfulness at the same concrete edges)")
    for p in h:
        y = interpolate(ind, p["concrete_edges"])
        if y is None:
            continue
        gaps.append(y - p["normalized"])
        print(f"  {p['concrete_edges']:>11,.0f} edges: hand {p['normalized']:.3f}  induced {y:.3f}  gap {y - p['normalized']:+.3f}")
    if gaps:
        print(f"mean_gap={sum(gaps) / len(gaps):+.3f} worst_gap={min(gaps):+.3f} "
              f"within_0.05={sum(abs(g) <= 0.05 for g in gaps)}/{len(gaps)}")


if __name__ == "__main__":
    main(*sys.argv[1:])
