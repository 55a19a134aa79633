"""The main job (`mechscope circuit --task ioi`) stage by stage: wall time of the behaviour pass, of
each method's attribution, of the selection of its curve circuits and of their evaluation, and of the
report. PEAP's curve is evaluated alone for the ratio, then both methods' curves together as the
main job does (they share each batch's clean and reference passes). Ends with
`ratio=<PEAP evaluation / PEAP attribution>` (issue 15 target: <= 4).

    .venv/bin/python benchmarks/bench_main_job.py [--device cpu] [--n 120] [--points out.json]

`--points FILE` writes every curve point (metric values and faithfulness) as JSON, and
`--compare FILE` checks them against a file written before a change (largest absolute difference per
field; `points_equal=<True|False>` at 1e-4 over the metric and faithfulness fields; concrete edge counts
changed with per-key query edges, which a non-positional circuit's live heads now count per key).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mechscope
from mechscope.circuits.discovery import prepare
from mechscope.circuits.evaluation import DEFAULT_FRACTIONS, faithfulness_curve, faithfulness_curves, select_circuits
from mechscope.devices import batch_size_for, resolve_device, synchronize
from mechscope.report.sections.circuit_data import circuit_payload
from mechscope.tasks import make_task

METRIC_FIELDS = ("soft", "hard", "normalized", "metric_circuit", "metric_model", "metric_empty")
FIELDS = METRIC_FIELDS + ("concrete_edges",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="ioi")
    parser.add_argument("--n", type=int, default=120)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--query-edges", default="per_key", help="PEAP's query edges: per_key | whole_row "
                        "(whole_row compares with points written before per-key query edges)")
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
    scores, chosen = {}, {}
    for method in ("peap", "eap"):
        options = {"query_edges": args.query_edges} if method == "peap" else {}
        scores[method] = stage(f"{method} attribution", lambda: mechscope.attribute(
            model, discovery, method, batch_size=batch, progress=False, **options))
        chosen[method] = stage(f"{method} selection", lambda: select_circuits(scores[method], DEFAULT_FRACTIONS, "greedy"))
    # PEAP's curve alone gives the ratio; the main job evaluates both methods' circuits in one run.
    stage("peap evaluation", lambda: faithfulness_curve(
        model, scores["peap"], evaluation, selection="greedy", batch_size=batch, progress=False,
        circuits=chosen["peap"]))
    curves = stage("evaluation of both curves (as the main job)", lambda: faithfulness_curves(
        model, {m: (scores[m], chosen[m]) for m in scores}, evaluation, selection="greedy", batch_size=batch,
        progress=False))
    stage("viewer data (every curve circuit)", lambda: circuit_payload(chosen["peap"], scores["peap"]))
    points = {m: [{k: getattr(p, k) for k in FIELDS} for p in curves[m].points] for m in curves}
    elapsed = time.perf_counter() - total - times["peap evaluation"]
    print(f"model={args.model} task={args.task} n={args.n} discovery={len(discovery)} "
          f"evaluation={len(evaluation)} batch={batch} device={device} query_edges={args.query_edges}")
    print(f"main job's stages without loading and report: {elapsed - times['load']:.1f} s")
    if args.points:
        args.points.write_text(json.dumps(points, indent=1))
    if args.compare:
        before = json.loads(args.compare.read_text())
        for field in FIELDS:
            worst = max(abs(a[field] - b[field]) for m in before for a, b in zip(before[m], points[m])
                        if isinstance(a[field], float) and abs(a[field]) < 1e30)
            print(f"{field}: largest difference from {args.compare}: {worst:.3g}")
        worst = max(abs(a[k] - b[k]) for m in before for a, b in zip(before[m], points[m]) for k in METRIC_FIELDS)
        print(f"points_equal={worst <= 1e-4} (metric and faithfulness fields)")
    print(f"ratio={times['peap evaluation'] / times['peap attribution']:.2f}")


if __name__ == "__main__":
    main()
