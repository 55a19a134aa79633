#!/bin/sh
# The lens acceptance run (README table): train a tuned lens for SmolLM2-135M on text sampled from the
# model (seed 0, 32 x 128 tokens, cached), then evaluate it and the logit lens on held-out sampled text
# (seed 1). Run from the repository root; OMP_NUM_THREADS=1 because the machine is shared.
set -e
OUT=${1:-results/lens}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"
time mechscope lens train --model smollm2-135m --tokens 1024 --tokens-per-step 64 --seed 0 --device cpu \
    --out "$OUT/smollm2.lens" --overwrite
time mechscope lens eval --model smollm2-135m --lens "$OUT/smollm2.lens" --count 4 --seed 1 --device cpu \
    --out "$OUT/eval" --overwrite
