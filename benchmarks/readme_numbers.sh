#!/usr/bin/env bash
# Re-runs every command behind a number in README.md, on the offline Fashion-MNIST files, each
# into a fresh workdir under $OUT (default runs/readme), timing each from process start.
#   bash benchmarks/readme_numbers.sh            # all (about 25 minutes on a 2-core CPU)
#   bash benchmarks/readme_numbers.sh bn_vs_no_bn batch_sizes   # some
# The CNN claims (about an hour), the paper reproductions (about 2 hours, each about 30
# minutes) and the Setups section's CNN and ResNet lines run only when named: cnn_claims,
# papers (or one of them, e.g. ioffe2015), cnn_b8, resnet20, resnet20_precise.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=idx:/usr/share/datasets/fashion-mnist
OUT=${OUT:-runs/readme}
CACHE=$(mktemp -d)  # an empty compilation cache: every timing is cold
trap 'rm -rf "$CACHE"' EXIT
steps=${*:-bn_vs_no_bn batch_sizes claims batch_sizes_grow batch_sizes_again devices parallel_equivalence speed conv_speed sgd half_precision augment}

run() {  # name, command...
  local name=$1; shift
  echo "== $name: $*"
  local t0=$(date +%s.%N)
  "$@"
  echo "== $name: $(awk -v t0="$t0" -v t1="$(date +%s.%N)" 'BEGIN {printf "%.1f", t1 - t0}') s"
}

bn_vs_no_bn() {  # step, extra settings...: the main experiment into a fresh $OUT/<step>
  local step=$1; shift
  rm -rf "$OUT/$step"
  run $step python experiments/bn_vs_no_bn.py --workdir="$OUT/$step" --config.data=$DATA \
      --config.compilation_cache_dir="$CACHE/$step" --config.progress=false "$@"
}

batch_size_study() {  # step, extra settings...: the batch-size study in the shared workdir
  local step=$1; shift
  run $step python experiments/batch_sizes.py --workdir="$OUT/batch_sizes" --config.data=$DATA \
      --config.target_val_accuracy=0.85 --config.compilation_cache_dir="$CACHE/$step" \
      --config.progress=false "$@"
}

for step in $steps; do
  case $step in
    bn_vs_no_bn) bn_vs_no_bn fmnist --config.seeds=5 ;;  # into $OUT/fmnist
    batch_sizes) rm -rf "$OUT/batch_sizes"; batch_size_study $step ;;
    batch_sizes_grow) batch_size_study $step --config.batch_sizes='(16,32,64,128,256,512)' \
        --config.seeds=7 ;;
    claims) rm -rf "$OUT/claims"; run $step python experiments/claims.py \
        --workdir="$OUT/claims" --config.data=$DATA --config.target_val_accuracy=0.85 \
        --config.batch_sizes_workdir="$OUT/batch_sizes" \
        --config.compilation_cache_dir="$CACHE/$step" ;;
    cnn_claims)  # the README's two CNN commands: claims 1-2, then the others at 1 eval an epoch
      rm -rf "$OUT/claims_cnn" "$OUT/claims_cnn_rest"
      cnn=(--config.data=$DATA --config.model=cnn --config.train_examples=6000
        --config.depth_width=16 --config.progress=false)
      run "$step lr" python experiments/claims.py --workdir="$OUT/claims_cnn" "${cnn[@]}" \
        --config.target_val_accuracy=0.8 --config.claims=lr \
        --config.compilation_cache_dir="$CACHE/${step}_lr"
      run "$step rest" python experiments/claims.py --workdir="$OUT/claims_cnn_rest" \
        "${cnn[@]}" --config.evals_per_epoch=1 \
        --config.claims=depth,regularization,shift,overhead,inference \
        --config.compilation_cache_dir="$CACHE/${step}_rest" ;;
    batch_sizes_again) batch_size_study $step ;;
    devices) for stats in sync local; do rm -rf "$OUT/8dev_$stats"
        XLA_FLAGS=--xla_force_host_platform_device_count=8 run "$step $stats" python \
          experiments/bn_vs_no_bn.py --workdir="$OUT/8dev_$stats" --config.data=$DATA \
          --config.bn_stats=$stats --config.norms='("batch",)' \
          --config.compilation_cache_dir="$CACHE/$step$stats" --config.progress=false; done ;;
    parallel_equivalence) XLA_FLAGS=--xla_force_host_platform_device_count=8 run $step \
        python benchmarks/parallel_equivalence.py --data=$DATA --steps=1,10,1000 ;;
    sgd) bn_vs_no_bn $step --config.seeds=3 --config.optimizer=momentum \
        --config.learning_rate=0.05 --config.lr_schedule=cosine --config.weight_decay=5e-4 ;;
    half_precision) bn_vs_no_bn $step --config.seeds=3 --config.half_precision=true ;;
    augment) bn_vs_no_bn $step --config.model=cnn --config.train_examples=6000 \
        --config.epochs=3 --config.seeds=3 --config.augment=crop_flip --config.standardize=true ;;
    cnn_b8) bn_vs_no_bn $step --config.model=cnn --config.train_examples=6000 \
        --config.batch_size=8 --config.epochs=2 --config.seeds=3 \
        --config.norms='("batch","group","batch_renorm","layer","none")' --config.norm_groups=8 \
        --config.renorm_warmup_steps=300 --config.renorm_rmax_steps=1200 \
        --config.renorm_dmax_steps=900 ;;
    resnet20|resnet20_precise)
      extra=(); [ $step = resnet20_precise ] && extra=(--config.norms='("batch",)'
        --config.precise_bn_examples=6000)
      bn_vs_no_bn $step --config.model=resnet --config.train_examples=6000 \
        --config.batch_size=128 --config.epochs=3 --config.seeds=3 "${extra[@]}" ;;
    conv_speed) run $step python benchmarks/conv_speed.py ;;
    speed) run $step python benchmarks/speed.py --data=$DATA --out="$OUT/speed.json" ;;
    papers) for paper in ioffe2015 hoffer2017 wu_he2018 wu_johnson2021 santurkar2018; do
        bash "$0" $paper; done ;;
    ioffe2015|hoffer2017|wu_he2018|wu_johnson2021|santurkar2018) rm -rf "$OUT/papers/$step"
      run $step python experiments/papers/$step.py --workdir="$OUT/papers/$step" \
        --config.data=$DATA --config.compilation_cache_dir="$CACHE/$step" \
        --config.progress=false ;;
    *) echo "unknown step $step"; exit 2 ;;
  esac
done
