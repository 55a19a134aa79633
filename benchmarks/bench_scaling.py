"""Attribution cost as the dataset grows: wall time per example and peak memory at 64, 256 and 1024
SmolLM2 IOI examples, streamed from a JSONL (and, with --variants memory,stream, also held in memory).

The IOI pairs are generated once (seed 0, the largest size) and written as a tokenized dataset JSONL;
every size takes the first N of them, so the sizes share their examples. Each (variant, size) runs in
a fresh subprocess, so that its peak resident memory (getrusage's high-water mark, which includes the
model) does not carry over from another size. Time is the `attribute` call alone (the model loads
before the clock starts); memory is the process's peak RSS at the end.

Run (from the repository root):
    OMP_NUM_THREADS=2 PYTHONPATH=src .venv/bin/python benchmarks/bench_scaling.py \
        [--sizes 64,256,1024,64] [--methods eap] [--variants stream] [--batch-size 16]

Prints one key=value line per (variant, method, size), then per variant and method
`ratio=<per-example time at the largest size / at the smallest>` and
`mem_ratio=<peak RSS at the largest size / at the smallest>` (the last variant and method listed are
printed last, unprefixed; targets: both within 1.3). A size listed twice is measured twice and its
per-example times averaged (peak memory: the larger), which guards the ratio against the machine's load
changing during a long run; `--sizes 64,256,1024,64` measures the smallest size before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(args) -> None:
    import torch

    from mechscope import load_model
    from mechscope.attribution import attribute
    from mechscope.data import PromptPairDataset
    from mechscope.data.streaming import stream_jsonl

    torch.manual_seed(0)
    model = load_model(args.model, device="cpu")
    if args.variant == "stream":
        dataset = stream_jsonl(args.data, limit=args.size)
    else:
        dataset = PromptPairDataset.load(args.data).subset(range(args.size))
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    scores = attribute(model, dataset, args.method, batch_size=args.batch_size, progress=False)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "loaded_kib": rss_loaded,
                      "n_examples": scores.n_examples, "checksum": float(scores.values.double().abs().sum())}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="64,256,1024,64")
    p.add_argument("--methods", default="eap")
    p.add_argument("--variants", default="stream", help="stream, memory or both (comma-separated)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data", default=None, help="(internal) the dataset JSONL")
    p.add_argument("--child", action="store_true", help="(internal) one measurement")
    p.add_argument("--size", type=int, default=0)
    p.add_argument("--method", default="eap")
    p.add_argument("--variant", default="stream")
    args = p.parse_args()
    if args.child:
        return child(args)

    from mechscope.models import load_tokenizer
    from mechscope.tasks import make_task

    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    print(f"threads={os.environ.get('OMP_NUM_THREADS', 'unset')} batch_size={args.batch_size} model={args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "ioi.jsonl"
        dataset = make_task("ioi", load_tokenizer(args.model), max(sizes), seed=0)
        dataset.model = args.model
        dataset.save(data)
        print(f"data_file_bytes={data.stat().st_size}")
        for variant in variants:
            for method in methods:
                per, peaks = {}, {}
                for n in sizes:  # a size listed twice (64,256,1024,64) is averaged: a check on load drift
                    cmd = [sys.executable, __file__, "--child", "--data", str(data), "--size", str(n), "--method",
                           method, "--variant", variant, "--batch-size", str(args.batch_size), "--model", args.model]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode != 0:
                        sys.exit(f"{variant} {method} n={n} failed:\n{out.stderr[-3000:]}")
                    r = json.loads(out.stdout.strip().splitlines()[-1])
                    per.setdefault(n, []).append(r["seconds"] / n)
                    peaks.setdefault(n, []).append(r["peak_kib"] / 1024)
                    print(f"{variant}_{method}_n{n}: time_per_example_s={per[n][-1]:.4f} total_s={r['seconds']:.1f} "
                          f"peak_rss_mib={peaks[n][-1]:.0f} rss_after_load_mib={r['loaded_kib'] / 1024:.0f}", flush=True)
                per = {n: sum(v) / len(v) for n, v in per.items()}
                peaks = {n: max(v) for n, v in peaks.items()}
                lo, hi = min(sizes), max(sizes)
                print(f"{variant}_{method}_ratio={per[hi] / per[lo]:.3f}")
                print(f"{variant}_{method}_mem_ratio={peaks[hi] / peaks[lo]:.3f}")
        print(f"ratio={per[hi] / per[lo]:.3f}")
        print(f"mem_ratio={peaks[hi] / peaks[lo]:.3f}")


if __name__ == "__main__":
    main()
