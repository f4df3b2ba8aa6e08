#!/usr/bin/env bash
# A GPU lease's work in stages that fit short calls (no network there; attn-zoo's needs
# beyond torch and triton are pandas, matplotlib, rich, psutil, pytest and, for -n,
# pytest-xdist). From the repository root:
#
#   bash scripts/gpu/session.sh tests        # pytest -m gpu on the default tiles
#   bash scripts/gpu/session.sh sweep RUN    # the README's GPU sweep into results/RUN,
#                                            # resumed where results/RUN exists
#   bash scripts/gpu/session.sh backward RUN # the backward alone (bench run --mode bwd) of
#                                            # triton and sdpa into results/RUN-bwd, resumed
#   bash scripts/gpu/session.sh times        # scripts/gpu/kernel_times.py
#   bash scripts/gpu/session.sh profile RUN  # each call's wall time against its kernels'
#                                            # device time: results/RUN/time-split-d*.csv
#
# "sweep", "times" and "profile" first compile in parallel, one process per mechanism, so that
# Triton's and Inductor's on-disk caches are warm before anything is timed (compiles
# of the autotuner's candidates took up to 33 s per mechanism on an H100). Each stage
# stops itself: STAGE_S seconds (default 540), the sweep by SIGINT, which keeps every
# row measured so far for the next "sweep RUN".
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
STAGE_S=${STAGE_S:-540}
LENS=512,1024,2048,4096,8192,16384
MECHANISMS=$($PY -c "import attn_zoo; print(' '.join(attn_zoo.names()))") || exit 1
export PYTHONUNBUFFERED=1
start=$(date +%s)
left() { echo $(( STAGE_S - ($(date +%s) - start) )); }

in_parallel() {  # in_parallel SECONDS COMMAND...: COMMAND MECHANISM for each, waited for
  local seconds=$1 pids=() m
  shift
  for m in $MECHANISMS; do
    timeout -k 5 "$seconds" "$@" "$m" > "/tmp/attn-zoo-warm-$m.log" 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"  # not a bare wait: it would also wait for a caller's process substitution
}

warm_sweep() {  # one untimed pass per mechanism over the sweep's compiled impls
  local scratch
  scratch=$(mktemp -d)
  in_parallel "$1" sh -c '"$0" -m attn_zoo.bench run --mechanisms "$3" --seq-lens "$1" \
      --dtype float16 --impls triton,flex --repeats 1 --min-time 0 --rounds 1 \
      --out "$2" --run-id "warm-$3"' "$PY" "$LENS" "$scratch"
  rm -rf "$scratch"
}

case "${1:-}" in
  tests)
    jobs=()
    $PY -c "import xdist" 2>/dev/null && jobs=(-n "${JOBS:-8}")
    ATTN_ZOO_AUTOTUNE=0 timeout -k 10 "$STAGE_S" $PY -m pytest -m gpu -q "${jobs[@]}" ;;
  sweep)
    run=${2:?"sweep needs a run id (results/RUN), e.g. h100-80gb-hbm3"}
    # the autotuner's choices, kept for the next stage and committed with the rows (the
    # warm processes tune side by side on one GPU, so their timings are not stored)
    tiles="results/$run/tiles.jsonl"
    if [ -f "results/$run/meta.json" ]; then
      ATTN_ZOO_TILES=$tiles timeout -s INT -k 30 "$(left)" $PY -m attn_zoo.bench run \
          --resume "results/$run"
    else
      warm_sweep $(( STAGE_S / 3 ))
      ATTN_ZOO_TILES=$tiles timeout -s INT -k 30 "$(left)" $PY -m attn_zoo.bench run \
          --seq-lens "$LENS" --dtype float16 --impls triton,flex,reference,sdpa --run-id "$run"
    fi
    echo "results/$run: $(( $(wc -l < "results/$run/results.csv") - 1 )) rows" ;;
  backward)
    run="${2:?"backward needs a run id, e.g. h100-80gb-hbm3"}-bwd"
    tiles="results/${2}/tiles.jsonl"  # the forward's autotuned tiles, where a sweep stored them
    if [ -f "results/$run/meta.json" ]; then
      ATTN_ZOO_TILES=$tiles timeout -s INT -k 30 "$(left)" $PY -m attn_zoo.bench run \
          --resume "results/$run"
    else
      ATTN_ZOO_TILES=$tiles timeout -s INT -k 30 "$(left)" $PY -m attn_zoo.bench run \
          --seq-lens 2048,8192 --dtype float16 --impls triton,sdpa --mode bwd --run-id "$run"
    fi
    echo "results/$run: $(( $(wc -l < "results/$run/results.csv") - 1 )) rows" ;;
  times)
    export ATTN_ZOO_AUTOTUNE=0
    in_parallel $(( STAGE_S / 3 )) $PY scripts/gpu/kernel_times.py warm
    timeout -k 10 "$(left)" $PY scripts/gpu/kernel_times.py time ;;
  profile)
    run=${2:?"profile needs a run id (results/RUN), e.g. h100-80gb-hbm3"}
    export ATTN_ZOO_AUTOTUNE=0
    in_parallel $(( STAGE_S / 3 )) $PY scripts/gpu/kernel_times.py warm
    for dim in 64 128; do
      timeout -k 10 "$(( $(left) / 3 ))" $PY -m attn_zoo.bench.time_split --head-dim "$dim" \
          --out "results/$run/time-split-d$dim.csv"
    done
    # where a small call's host time goes (0.4 ms for dense at N = 512 on the H100)
    timeout -k 10 "$(left)" $PY -m attn_zoo.bench.time_split --seq-len 512 --host-top 8 \
        --out "results/$run/time-split-n512.csv" ;;
  *)
    echo "usage: bash scripts/gpu/session.sh tests | sweep RUN | backward RUN | times | profile RUN" >&2
    exit 2 ;;
esac
