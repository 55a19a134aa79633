"""PEAP (within-position per span + crossing edges) versus EAP on the same batch, in the same run.

Prints both wall times (medians of --repeats interleaved runs), the peak memory of the process, and
ends with `ratio=<peap/eap>` (issue 5 target: <= 1.5).

    .venv/bin/python benchmarks/bench_peap.py [--model smollm2-135m] [--batch 16]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import mechscope
from mechscope.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = mechscope.load_model(args.model, device="cpu")
    data = make_task("ioi", model.tokenizer, args.batch, seed=0)
    runs = {"eap": [], "peap": []}
    for method in runs:  # warm-up
        mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
    for _ in range(args.repeats):
        for method, times in runs.items():
            start = time.perf_counter()
            mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
            times.append(time.perf_counter() - start)
    eap, peap = statistics.median(runs["eap"]), statistics.median(runs["peap"])
    print(f"model={args.model} batch={args.batch} spans={len(data.schema)}")
    print(f"eap: {eap:.3f} s")
    print(f"peap: {peap:.3f} s")
    print(f"peak_rss_gib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f}")
    print(f"ratio={peap / eap:.3f}")


if __name__ == "__main__":
    main()
