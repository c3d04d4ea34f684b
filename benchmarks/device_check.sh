#!/usr/bin/env bash
# The checks to run the day bn_jax has a GPU or TPU (about 8 minutes on one GPU): the tests
# that exercise the device, then the speed benchmark (the batch-size grid cold and warm, 1 / 8
# / 64 seeds trained together, step throughput, the CNN and ResNet-20 steps, ResNet-20 in
# bfloat16 vs float32). Results as JSON under $OUT (default runs/device_check):
#   OUT=/tmp/out bash benchmarks/device_check.sh
# Needs jax with the accelerator's plugin, flax, optax, orbax-checkpoint, matplotlib, tqdm,
# absl-py, pytest, ml_collections and tensorboardX; not TensorFlow (the data is generated).
# docs/devices.md says how to run it and holds the table it fills.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/device_check}
mkdir -p "$OUT"
python -c 'import jax, json, sys; json.dump({"backend": jax.default_backend(),
  "devices": [str(d) for d in jax.devices()], "jax": jax.__version__}, sys.stdout)' \
    | tee "$OUT/device.json"
echo
# 1. The device-relevant tests (steps, loop, models, ResNet, norms, PreciseBN, save points).
t0=$(date +%s)
timeout 300 python -m pytest -q -m "not slow" -p no:cacheprovider --junitxml="$OUT/tests.xml" \
    tests/test_train.py tests/test_loop.py tests/test_models.py tests/test_resnet.py \
    tests/test_norms.py tests/test_precise_bn.py tests/test_save_states.py
tests=$?
echo "== tests: exit $tests, $(( $(date +%s) - t0 )) s"
# 2. Speed, in one process (compare ratios measured in one run).
t0=$(date +%s)
timeout 360 python benchmarks/speed.py --data=synthetic:60000 --skip_torch \
    --out="$OUT/speed.json"
speed=$?
echo "== speed: exit $speed, $(( $(date +%s) - t0 )) s"
exit $(( tests || speed ))
