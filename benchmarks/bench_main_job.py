"""The main job (`mechscope circuit --task ioi`) stage by stage: wall time of the behaviour pass, of
each method's attribution, of the selection of its curve circuits and of their evaluation, and of the
report. Ends with `ratio=<PEAP evaluation / PEAP attribution>` (issue 15 target: <= 4).

    .venv/bin/python benchmarks/bench_main_job.py [--device cpu] [--n 120] [--points out.json]

`--points FILE` writes every curve point (metric values and faithfulness) as JSON, and
`--compare FILE` checks them against a file written before a change (largest absolute difference,
`points_equal=<True|False>` at 1e-4).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mechscope
from mechscope.circuits.discovery import display_circuits, prepare
from mechscope.circuits.evaluation import DEFAULT_FRACTIONS, faithfulness_curve, select_circuits
from mechscope.devices import batch_size_for, resolve_device, synchronize
from mechscope.tasks import make_task

FIELDS = ("soft", "hard", "normalized", "metric_circuit", "metric_model", "metric_empty", "concrete_edges")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--points", type=Path, help="write the curve points here (JSON)")
    parser.add_argument("--compare", type=Path, help="compare the curve points with this file")
    args = parser.parse_args()
    device = resolve_device(args.device)
    times: dict[str, float] = {}

    def stage(name, fn):
        synchronize(device)
        start = time.perf_counter()
        out = fn()
        synchronize(device)
        times[name] = time.perf_counter() - start
        print(f"{name}: {times[name]:.2f} s", flush=True)
        return out

    total = time.perf_counter()
    model = stage("load", lambda: mechscope.load_model(args.model, device=device))
    batch = batch_size_for(model, args.batch)
    data = make_task(args.task, model.tokenizer, args.n, seed=0)
    _, discovery, evaluation = stage("behaviour", lambda: prepare(model, data, seed=0, batch_size=batch,
                                                                  progress=False))
    points = {}
    for method in ("peap", "eap"):
        scores = stage(f"{method} attribution", lambda: mechscope.attribute(
            model, discovery, method, batch_size=batch, progress=False))
        chosen = stage(f"{method} selection", lambda: select_circuits(scores, DEFAULT_FRACTIONS, "greedy"))
        curve = stage(f"{method} evaluation", lambda: faithfulness_curve(
            model, scores, evaluation, selection="greedy", batch_size=batch, progress=False, circuits=chosen))
        points[method] = [{k: getattr(p, k) for k in FIELDS} for p in curve.points]
        if method == "peap":
            stage("display circuits", lambda: display_circuits(scores))
    elapsed = time.perf_counter() - total
    print(f"model={args.model} task={args.task} n={args.n} discovery={len(discovery)} "
          f"evaluation={len(evaluation)} batch={batch} device={device}")
    for method in ("peap", "eap"):
        print(f"{method}: evaluation / attribution = "
              f"{times[f'{method} evaluation'] / times[f'{method} attribution']:.2f}")
    print(f"job without loading and report: {elapsed - times['load']:.1f} s")
    if args.points:
        args.points.write_text(json.dumps(points, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        worst = max(abs(a[k] - b[k]) for m in before for a, b in zip(before[m], points[m]) for k in FIELDS
                    if isinstance(a[k], float) and abs(a[k]) < 1e30)
        print(f"largest difference from {args.compare}: {worst:.3g}")
        print(f"points_equal={worst <= 1e-4}")
    print(f"ratio={times['peap evaluation'] / times['peap attribution']:.2f}")


if __name__ == "__main__":
    main()
