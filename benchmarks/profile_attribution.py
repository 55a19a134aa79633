"""Where attribution spends its time: torch.profiler tables for one `attribute` call per method.

    python benchmarks/profile_attribution.py --model DIR [--device cuda] [--batch 64] [--methods eap,peap]

Prints, per method, the wall time of one warm call, the number of kernel launches (on CUDA) and the
operators with the most self time on the device (and on the host).
"""

from __future__ import annotations

import argparse
import time

from torch.profiler import ProfilerActivity, profile

import mechscope
from mechscope.devices import resolve_device, synchronize
from mechscope.tasks import make_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default="eap,peap")
    parser.add_argument("--rows", type=int, default=12)
    args = parser.parse_args()
    device = resolve_device(args.device)
    model = mechscope.load_model(args.model, device=device)
    data = make_task("ioi", model.tokenizer, args.batch, seed=0)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    for method in args.methods.split(","):
        mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)  # warm-up
        synchronize(device)
        start = time.perf_counter()
        mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
        synchronize(device)
        wall = time.perf_counter() - start
        with profile(activities=activities) as prof:
            mechscope.attribute(model, data, method, batch_size=args.batch, progress=False)
            synchronize(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
        print(f"== {method}: {wall:.3f} s warm, batch {args.batch}, kernel launches {launches}")
        if cuda:
            print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=40))
        print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=40))


if __name__ == "__main__":
    main()
