"""Data-parallel attribution: the same EAP run with one process and with two gloo processes (torchrun).

Scores EAP on --n IOI examples of --model, first in one plain process (no process group: the
single-process path), then under `torch.distributed.run --nproc-per-node 2` (each rank its half of the
examples, the sums all-reduced). Each process uses --threads threads (default 1, so that two processes
use the machine's two cores and one process one core); `--compare-threads` adds a one-process run with
2 threads, the fairer baseline on a 2-core machine. The time is the attribution alone (after the model
loads, between barriers), the best of --repeats runs. Checks that the scores agree, then prints

    t1=<s> t2=<s> speedup=<t1/t2>

On a shared machine the timings are pessimistic (other processes take cores too).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_distributed.py [--model smollm2-135m] [--n 64]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def worker(args) -> None:
    """One process (or one rank under torchrun): time `attribute`, rank 0 saves scores and time."""
    torch.set_num_threads(args.threads)
    import mechscope
    from mechscope import distributed
    from mechscope.tasks import make_task

    model = mechscope.load_model(args.model, device="cpu")
    ds = make_task("ioi", model.tokenizer, args.n, 0)
    mechscope.attribute(model, ds.subset(range(2)), "eap", batch_size=2, progress=False)  # warm-up
    best = float("inf")
    for _ in range(args.repeats):
        distributed.barrier()
        start = time.perf_counter()
        scores = mechscope.attribute(model, ds, "eap", batch_size=args.batch, progress=False)
        distributed.barrier()
        best = min(best, time.perf_counter() - start)
    if distributed.is_main():
        torch.save({"time": best, "values": scores.values, "world": distributed.world_size()}, args.out)


def run(cmd: list[str], threads: int) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(threads), CUDA_VISIBLE_DEVICES="")
    subprocess.run(cmd, env=env, check=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--examples", "--n", dest="n", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--compare-threads", action="store_true")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    me = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--examples", str(args.n),
          "--batch", str(args.batch), "--repeats", str(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        one, two, wide = (str(Path(tmp) / f) for f in ("one.pt", "two.pt", "wide.pt"))
        run([sys.executable, *me, "--threads", str(args.threads), "--out", one], args.threads)
        run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *me, "--threads", str(args.threads), "--out", two], args.threads)
        r1, r2 = torch.load(one), torch.load(two)
        if args.compare_threads:
            run([sys.executable, *me, "--threads", "2", "--out", wide], 2)
            rw = torch.load(wide)
    assert r1["world"] == 1 and r2["world"] == 2, (r1["world"], r2["world"])
    diff = float((r1["values"] - r2["values"]).abs().max() / r1["values"].abs().max())
    print(f"model={args.model} examples={args.n} batch={args.batch} threads_per_process={args.threads} "
          f"cpus={os.cpu_count()} load_average={os.getloadavg()[0]:.2f}")
    print(f"max_relative_difference={diff:.2e}")
    print(f"t1={r1['time']:.2f}s (1 process) t2={r2['time']:.2f}s (2 gloo processes)")
    if args.compare_threads:
        print(f"t1_2threads={rw['time']:.2f}s speedup_vs_2threads={rw['time'] / r2['time']:.3f}")
    print(f"speedup={r1['time'] / r2['time']:.3f}")


if __name__ == "__main__":
    main()
