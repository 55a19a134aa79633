"""PEAP (within-position per span + crossing edges) versus EAP on the same batch, in the same run.

Prints both wall times (medians of --repeats interleaved runs, synchronised on a GPU), the peak
memory, and ends with `ratio=<peap/eap>` (issue 5 target on CPU: <= 1.5; issue 13 on a GPU: <= 1.3).

    .venv/bin/python benchmarks/bench_peap.py [--model smollm2-135m] [--batch 16] [--device cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import mechscope
from bench_attribution import device_name, memory_line, peak_rss_gib
from mechscope.devices import resolve_device, synchronize
from mechscope.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = mechscope.load_model(args.model, device=device)
    data = make_task("ioi", model.tokenizer, args.batch, seed=0)
    runs = {"eap": [], "peap": []}
    rss_before = peak_rss_gib()
    for method in runs:  # warm-up
        mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
    synchronize(device)
    for _ in range(args.repeats):
        for method, times in runs.items():
            start = time.perf_counter()
            mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
            synchronize(device)
            times.append(time.perf_counter() - start)
    eap, peap = statistics.median(runs["eap"]), statistics.median(runs["peap"])
    print(f"model={args.model} device={device_name(device)} batch={args.batch} spans={len(data.schema)}")
    print(f"eap: {eap:.3f} s")
    print(f"peap: {peap:.3f} s")
    print(memory_line(device, rss_before))
    print(f"ratio={peap / eap:.3f}")


if __name__ == "__main__":
    main()
