#!/usr/bin/env bash
# The GPU path, end to end, in a few minutes (docs/gpu.md):
#   1. the CUDA tests (pytest -m cuda tests/test_cuda.py);
#   2. `nf1prov train` with AMP on configs/demo.toml (train.device=cuda) on `nf1prov demo-data`
#      output, in a throwaway git workspace with its own identity and mlflow.db, then
#      `nf1prov predict` with the trained model;
#      then data-parallel training, `train --nproc N` (NCCL on N >= 2 GPUs, else 2 ranks
#      with gloo on the CPU);
#   3. `nf1prov reproduce` of that model on the GPU, within $REPRO_TOL, 0.1 (CUDA is not
#      bit-deterministic; on a CPU the tolerance is 0: bit-identical);
#   4. predict_stack throughput, MP/s on cuda vs cpu (benchmarks/bench_gpu_predict.py), and
#      against MONAI's sliding_window_inference on the same device (benchmarks/bench_predict.py,
#      when monai is installed: it is in benchmarks/gpu_wheels.txt);
#   5. training samples/s of the width-64 UNet on 512-px crops: eager fp32, AMP bf16 and fp16,
#      torch.compile with channels-last, and the MFU (benchmarks/bench_gpu_train.py; on a CPU a
#      width-4 UNet on 64-px crops, without torch.compile, whose compilation takes minutes there).
# Without CUDA it still runs, on the CPU, and says what it skipped. Prints a summary of figures
# at the end; with $OUT set, writes $OUT/gpu_check.log and $OUT/gpu_check_summary.txt.
# Exit 0 when every check passed, 1 otherwise.
#
#   bash benchmarks/gpu_check.sh
#
# Python: .venv/bin/python when there is one and $PY is unset; else $PY (default python3), and
# then the wheels in $WHL (.whl/, from benchmarks/fetch_gpu_wheels.sh), if any, are installed
# into $SITE (/tmp/site) first and put on PYTHONPATH. Other settings: EPOCHS (4), REPRO_TOL
# (0.1 on CUDA: 0.089 was measured on an H100), BENCH_ARGS (bench_gpu_predict.py's options),
# PREDICT_ARGS (bench_predict.py's), TRAIN_BENCH_ARGS (bench_gpu_train.py's).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT" && exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
if [ -z "${PY:-}" ] && [ -x .venv/bin/python ]; then
  PY=$ROOT/.venv/bin/python
else  # e.g. the offline GPU machine: nf1prov's missing dependencies come as wheels in .whl/
  PY=${PY:-python3} WHL=${WHL:-.whl} SITE=${SITE:-/tmp/site}
  unset PYTHONDONTWRITEBYTECODE  # installed --no-compile: let the first import cache byte-code
  if [ -d "$WHL" ] && ! $PY -m pip --version >/dev/null 2>&1; then  # no pip: unzip them
    for w in "$WHL"/*.whl; do $PY -m zipfile -e "$w" "$SITE" || exit 1; done
    export PYTHONPATH=$SITE:$PWD
  elif [ -d "$WHL" ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" "$WHL"/*.whl && export PYTHONPATH=$SITE:$PWD \
      || { echo "gpu_check: installing the wheels of $WHL into $SITE failed"; exit 1; }
  else
    export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
export PYTHONUNBUFFERED=1 MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR=false TQDM_DISABLE=1
export GIT_AUTHOR_NAME="nf1prov gpu check" GIT_AUTHOR_EMAIL=gpu-check@nf1prov.invalid
export GIT_COMMITTER_NAME=$GIT_AUTHOR_NAME GIT_COMMITTER_EMAIL=$GIT_AUTHOR_EMAIL
export GIT_CONFIG_GLOBAL=/dev/null GIT_CONFIG_NOSYSTEM=1
unset MLFLOW_TRACKING_URI MLFLOW_RUN_ID MLFLOW_EXPERIMENT_ID MLFLOW_EXPERIMENT_NAME
EPOCHS=${EPOCHS:-4}
START=$SECONDS
FAILED=0
SUMMARY=()
WS=$(mktemp -d /tmp/nf1prov-gpu-check.XXXXXX)
trap 'rm -rf "$WS"' EXIT

say() { SUMMARY+=("$*"); }
header() { echo; echo "=== $* ($((SECONDS - START)) s)"; }
fail() { FAILED=1; say "FAIL  $*"; }

header "environment"
CUDA=$($PY - <<'EOF'
import os, sys, torch
cuda = torch.cuda.is_available()
gpu = torch.cuda.get_device_name(0) if cuda else "none"
print(f"python {sys.version.split()[0]} ({sys.executable}), torch {torch.__version__}, CUDA "
      f"{torch.version.cuda}, GPU {gpu}, {os.cpu_count()} CPUs", file=sys.stderr)
print(int(cuda))
EOF
) || { echo "cannot import torch with $PY"; exit 1; }
if [ "$CUDA" = 1 ]; then DEVICE=cuda; TOL=${REPRO_TOL:-0.1}; else DEVICE=cpu; TOL=0; fi
[ "$CUDA" = 1 ] || say "NOTE  no CUDA device: the CUDA tests and the cuda timing are skipped; training, reproduce and predict run on the CPU, the training throughput on a tiny UNet"
$PY -c "import mlflow, nf1prov; print('mlflow', mlflow.__version__, 'nf1prov from', nf1prov.__file__)" \
  || { echo "nf1prov or mlflow cannot be imported (wheels missing? see docs/gpu.md)"; exit 1; }

header "1. CUDA tests: pytest -m cuda tests/test_cuda.py"
T=$SECONDS
if $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py 2>&1 | tee "$WS/pytest.out"; then
  say "PASS  cuda tests: $(tail -n 1 "$WS/pytest.out" | tr -d '=' | xargs) ($((SECONDS - T)) s)"
else
  fail "cuda tests: $(tail -n 1 "$WS/pytest.out" | tr -d '=' | xargs)"
fi

header "2. train configs/demo.toml (train.device=$DEVICE, $EPOCHS epochs) in a throwaway workspace"
cd "$WS" || exit 1
if ! command -v git >/dev/null; then
  fail "train/reproduce/predict: no git on PATH"
elif ! $PY -c 'import sys; from nf1prov.demo import prepare_workspace; prepare_workspace(sys.argv[1])' "$WS/ws" \
  || ! (cd ws && $PY -m nf1prov demo-data data); then
  fail "train: could not set up the workspace and its data"
else
  cd ws || exit 1
  T=$SECONDS
  $PY -m nf1prov train --config configs/demo.toml --data-root data --set train.device=$DEVICE \
    --set train.epochs="$EPOCHS" | tee "$WS/train.out"
  RC=${PIPESTATUS[0]}
  CODENAME=$(grep -o 'codename:[[:space:]]*[a-z]*-[a-z]*-[0-9]*' "$WS/train.out" | tail -n 1 \
    | sed 's/^codename:[[:space:]]*//')
  if [ "$RC" != 0 ] || [ -z "$CODENAME" ]; then
    fail "train on $DEVICE (exit $RC${CODENAME:+, model $CODENAME})"
  else
    say "PASS  train on $DEVICE$([ "$CUDA" = 1 ] && echo ' (AMP)'): $CODENAME, $EPOCHS epochs in $((SECONDS - T)) s"
    header "2b. predict with $CODENAME on $DEVICE"
    T=$SECONDS
    if $PY -m nf1prov predict "$CODENAME" data/NF0014_T1 -o "$WS/pred" --device "$DEVICE" \
      --no-progress \
      && [ -n "$(find "$WS/pred" -name '*_labels.ome.tif')" ]; then
      say "PASS  predict CLI on $DEVICE: $(find "$WS/pred" -name '*_labels.ome.tif' | wc -l) stacks in $((SECONDS - T)) s"
    else
      fail "predict CLI on $DEVICE"
    fi
    header "2c. data-parallel training: train --nproc (NCCL with two GPUs or more, else gloo on CPU)"
    GPUS=$($PY -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    if [ "${GPUS:-0}" -ge 2 ]; then NP=$GPUS; NPDEV=cuda; else NP=2; NPDEV=cpu; fi
    T=$SECONDS
    if $PY -m nf1prov train --config configs/demo.toml --data-root data --set train.device=$NPDEV \
      --set train.epochs=1 --set train.max_batches_per_epoch=8 --nproc "$NP" | tee "$WS/ddp.out" \
      && grep -q '^codename:' "$WS/ddp.out"; then
      say "PASS  train --nproc $NP on $NPDEV ($([ "$NPDEV" = cuda ] && echo NCCL || echo gloo)) in $((SECONDS - T)) s"
    else
      fail "train --nproc $NP on $NPDEV"
    fi
    header "3. reproduce $CODENAME on $DEVICE --tolerance $TOL"
    T=$SECONDS
    $PY -m nf1prov reproduce "$CODENAME" --data-root data --tolerance "$TOL" | tee "$WS/repro.out"
    RC=${PIPESTATUS[0]}
    DIFF=$(awk '/^ *metric +original +reproduced +difference/ {t = 1; next}
      t && NF == 4 {d = $4 < 0 ? -$4 : $4; n++; if (d > m) m = d; next} t {t = 0}
      END {printf "%d metrics, max |difference| %.3g", n, m}' "$WS/repro.out")
    if [ "$RC" = 0 ]; then
      say "PASS  reproduce on $DEVICE: $DIFF, tolerance $TOL ($((SECONDS - T)) s)"
    else
      fail "reproduce on $DEVICE (exit $RC): $DIFF, tolerance $TOL"
    fi
  fi
fi
cd "$ROOT" || exit 1

header "4. predict_stack throughput: benchmarks/bench_gpu_predict.py"
[ "$CUDA" = 1 ] || BENCH_ARGS=${BENCH_ARGS:---cpu-slices 1}
T=$SECONDS
# shellcheck disable=SC2086
if $PY benchmarks/bench_gpu_predict.py ${BENCH_ARGS:-} 2>&1 | tee "$WS/bench.out"; then
  say "PASS  predict throughput ($((SECONDS - T)) s): $(sed -n 's/^RESULT //p' "$WS/bench.out")"
else
  fail "predict throughput benchmark"
fi

header "4b. predict_stack against MONAI's sliding_window_inference: benchmarks/bench_predict.py"
if $PY -c "import monai" 2>/dev/null; then
  T=$SECONDS
  [ "$CUDA" = 1 ] && PREDICT_ARGS=${PREDICT_ARGS:-} || PREDICT_ARGS=${PREDICT_ARGS:---case small}
  # shellcheck disable=SC2086
  if $PY benchmarks/bench_predict.py $PREDICT_ARGS 2>&1 | tee "$WS/peer.out"; then
    while read -r line; do
      say "PASS  predict vs MONAI: $line"
    done < <(sed -n 's/^RESULT //p' "$WS/peer.out")
    say "TIME  predict vs MONAI: $((SECONDS - T)) s"
  else
    fail "predict against MONAI benchmark"
  fi
else
  say "SKIP  predict vs MONAI: monai is not installed (pip install monai==1.6.1)"
fi

header "5. training throughput: benchmarks/bench_gpu_train.py"
[ "$CUDA" = 1 ] || TRAIN_BENCH_ARGS=${TRAIN_BENCH_ARGS:---device cpu --width 4 --crop 64 --batch-size 4 --warmup 2 --steps 2 --repeats 2 --settings eager-fp32,amp-bf16,amp-fp16}
T=$SECONDS
# shellcheck disable=SC2086
if $PY benchmarks/bench_gpu_train.py ${TRAIN_BENCH_ARGS:-} 2>&1 | tee "$WS/train_bench.out"; then
  say "PASS  train throughput ($((SECONDS - T)) s): $(sed -n 's/^RESULT //p' "$WS/train_bench.out")"
  while read -r line; do
    say "NOTE  train throughput: $line"
  done < <(grep ' skipped: ' "$WS/train_bench.out" | tr -s ' ')
else
  fail "train throughput benchmark (bench_gpu_train.py)"
fi

header "summary"
say "TIME  $((SECONDS - START)) s in all; device $DEVICE"
printf '%s\n' "${SUMMARY[@]}" | tee ${OUT:+"$OUT/gpu_check_summary.txt"}
[ "$FAILED" = 0 ] && echo "gpu_check: all checks passed" || echo "gpu_check: FAILED"
exit "$FAILED"
