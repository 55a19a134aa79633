#!/usr/bin/env bash
# The project's GPU checks in one script, for a machine with CUDA where the packaged weights are not
# installed: random-weight models in the packaged models' shapes (configs and tokenizers in $1,
# default .gpu/), the `gpu` tests, and the attribution benchmarks on the GPU.
#
#   bash benchmarks/gpu_check.sh [CONFIG_DIR] [OUT_DIR]     (BENCH=0: the tests alone)
#
# The exit status is pytest's.
set -uo pipefail
cfg=${1:-.gpu}
out=${2:-/tmp/mechscope-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" MECHSCOPE_CACHE="$out/cache"
py=${PYTHON:-python3}
nvidia-smi -L
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
if [ "${BENCH:-1}" != 0 ]; then
  $py benchmarks/random_model.py --like "$cfg/smollm2" --out "$out/smollm2-random"
  $py benchmarks/random_model.py --like "$cfg/smollm2" --out "$out/gpt2-random" --arch gpt2
  [ -d "$cfg/gemma3" ] && $py benchmarks/random_model.py --like "$cfg/gemma3" --out "$out/gemma3-random"
fi
$py -m pytest -q -p no:cacheprovider -m gpu tests/ --tb=short -rfE 2>&1 | tee "$out/pytest.log" | tail -60
status=${PIPESTATUS[0]}
[ "${BENCH:-1}" = 0 ] && exit $status
cd benchmarks
for batch in 16 64; do
  $py bench_attribution.py --model "$out/smollm2-random" --device cuda --batch $batch --repeats 5
  $py bench_peap.py --model "$out/smollm2-random" --device cuda --batch $batch --repeats 3
done
$py bench_attribution.py --model "$out/gpt2-random" --device cuda --batch 64 --repeats 5
if [ -d "$out/gemma3-random" ]; then
  $py bench_attribution.py --model "$out/gemma3-random" --device cuda --batch 64 --repeats 5
  $py bench_peap.py --model "$out/gemma3-random" --device cuda --batch 64 --repeats 3
fi
${PROFILE:+$py profile_attribution.py --model "$out/smollm2-random" --device cuda --batch 64}
exit $status
