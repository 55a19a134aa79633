"""Train the induction toy with its defaults and print the acceptance figures as key=value lines.

Acceptance: induction_score >= 0.9 on held-out repeated sequences, the previous-token head found in
layer 0 and the induction head in layer 1, and the smallest greedy PEAP circuit with normalised
faithfulness >= 0.8 holding the K-composition edges (peap_check=pass).

    .venv/bin/python benchmarks/bench_toy_induction.py [--steps 1500] [--device cpu] [--out DIR]
        [--figure docs/images/toy-induction.png] [--fixture tests/data/toy_induction]

--fixture writes the trained model without its optimiser state (a small test fixture, read by
tests/test_toy_induction.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mechscope.devices import resolve_device
from mechscope.toys.induction import NAME, InductionConfig, analyze, train
from mechscope.toys.training import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=InductionConfig.steps)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: a temporary one)")
    parser.add_argument("--figure", type=Path, default=None, help="write the analysis figure (PNG) here")
    parser.add_argument("--fixture", type=Path, default=None, help="write the model (no optimiser) here")
    args = parser.parse_args()
    device = resolve_device(args.device)
    config = InductionConfig(steps=args.steps, seed=args.seed)
    tmp = None
    out = args.out
    if out is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-induction-"))
        out = tmp / "ckpt"
    start = time.perf_counter()
    trained = train(config, out=out, device=device, progress=False)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    analysis = analyze(trained, progress=False)
    analyze_seconds = time.perf_counter() - start
    s = analysis.summary
    print(f"device={device} threads={torch.get_num_threads()} steps={config.steps} seed={config.seed}")
    for key in ("prev_token_head", "prev_token_score", "induction_head", "induction_score", "loss_first_half",
                "loss_repeated_half", "loss_chance", "peap_smallest_circuit_edges", "peap_smallest_circuit_normalized",
                "peap_prev_to_key_at_B1", "peap_key_B1_to_A2", "peap_top_layer1_key_edge"):
        value = s.get(key)
        print(f"{key}={value:.4f}" if isinstance(value, float) else f"{key}={value}")
    heads_ok = s["heads_in_expected_layers"]
    print(f"heads_identified={'pass' if heads_ok else 'fail'}")
    print(f"induction_check={'pass' if s['induction_score'] >= 0.9 else 'fail'}")
    print(f"peap_check={'pass' if s['peap_key_edge_in_circuit'] else 'fail'}")
    print(f"train_seconds={seconds:.1f}")
    print(f"analyze_seconds={analyze_seconds:.1f}")
    if args.figure:
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        analysis.figure(args.figure)
    if args.fixture:
        save_checkpoint(args.fixture, NAME, config, trained.model.to("cpu"), None, trained.state)
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
