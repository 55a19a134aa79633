"""Cold versus cached load of a packaged model, each in a fresh process.

The cold load converts the GGUF file (dequantize, write safetensors) into an empty cache; the second
load, in a new process, reads the cache. Both time `load_model` alone (imports excluded) and the
whole process. Acceptance (issue 2): warm/cold <= 0.2.

    .venv/bin/python benchmarks/bench_load.py [--model smollm2-135m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import mechscope
t1 = time.perf_counter()
mechscope.load_model(sys.argv[1], device="cpu")
t2 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1}))
"""


def run_child(model: str, cache: str) -> dict:
    env = dict(os.environ, MECHSCOPE_CACHE=cache)
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, "-c", CHILD, model], env=env, capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - start
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mechscope-bench-cache-") as cache:
        cold = run_child(args.model, cache)
        warm = run_child(args.model, cache)
    print(f"model={args.model}")
    for name, r in (("cold", cold), ("warm", warm)):
        print(f"{name}: load_model {r['load_s']:.2f} s, import {r['import_s']:.2f} s, whole process {r['process_s']:.2f} s")
    print(f"process_ratio={warm['process_s'] / cold['process_s']:.3f}")
    print(f"ratio={warm['load_s'] / cold['load_s']:.3f}")


if __name__ == "__main__":
    main()
