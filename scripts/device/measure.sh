#!/bin/bash
# On the device, detached (setsid nohup bash scripts/device/measure.sh STEP... &): the measurements
# issues 19 and 21 still need, in the order given (default: all), each log under /tmp/job and a line in
# /tmp/job/progress per step; "=== done" at the end. Poll with scripts/device/poll.sh.
mkdir -p /tmp/job; cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  > /tmp/job/pip.log 2>&1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 MEMLM_RESULTS=/tmp/job/results
P=/tmp/job/progress
step() { echo "=== $1 $(date -u +%H:%M:%S)" >> $P; }
ROWS="seed-small seed-xl-small seed-knn-small seed-compressive-small seed-mem-small depth-xpos-knn-small"
run_step() {
  case "$1" in
    kernels)  # the span bias's gradient: dense table against a per-distance one
      for extra in "" "--bias-grad"; do
        timeout 150 python3 scripts/mask_kernels_bench.py --k-len 1152 --bias $extra --span \
          --only flex-b64,flex-span,flex-relbias >> /tmp/job/kernels.log 2>&1
      done ;;
    train-graphs)  # every row in CUDA-graph mode, with the race's x-transformers-XL
      timeout 900 python3 -m memlm_bench --presets $ROWS --peer-names "x-transformers XL race" --no-generate \
        --steps 10 --warmup 3 --repeats 2 --profile-steps 3 --compile-mode reduce-overhead \
        > /tmp/job/train-bench-graphs.log 2>&1 ;;
    span)  # seed-mem-small with the spans' gradient through the dense bias against the ramp band alone
      timeout 600 python3 -m memlm_bench --presets seed-small seed-mem-small \
        "seed-mem-small memory.adaptive_span.gradient=band" --no-peers --no-generate --steps 10 --warmup 3 \
        --repeats 2 --profile-steps 3 > /tmp/job/train-bench-span.log 2>&1 ;;
    train-default)  # the same rows in torch.compile's default mode
      timeout 900 python3 -m memlm_bench --presets $ROWS --peer-names "x-transformers XL race" --no-generate \
        --steps 10 --warmup 3 --repeats 2 > /tmp/job/train-bench-default.log 2>&1 ;;
    decode)  # graph decode with the memory rolling four times
      timeout 500 python3 -m memlm_bench --presets seed-xl-small seed-compressive-small seed-mem-small seed-knn-small \
        depth-xpos-knn-small --no-peers --decode graph --gen-prompt-len 16 --gen-new-tokens 2048 \
        --gen-batch-sizes 1 16 --no-compile --steps 1 --warmup 1 --repeats 1 > /tmp/job/decode-bench.log 2>&1 ;;
    serve)  # the server's figures (issue 21): a short seed-xl-small run served eagerly and through static decoding
      timeout 200 python3 -m memlm.cli train --preset seed-xl-small --steps 30 --out /tmp/job/run-xl \
        > /tmp/job/serve-train.log 2>&1
      for mode in static eager; do
        python3 -m memlm.cli serve /tmp/job/run-xl --decode $mode --port 8000 > /tmp/job/serve-$mode.log 2>&1 &
        server=$!
        for _ in $(seq 60); do curl -s http://127.0.0.1:8000/v1/models > /dev/null 2>&1 && break; sleep 2; done
        for sessions in "" "--sessions"; do
          echo "== $mode $sessions" >> /tmp/job/serve-load.log
          timeout 240 python3 scripts/serve_load.py --clients 1 8 64 --requests 64 --max-tokens 64 $sessions \
            >> /tmp/job/serve-load.log 2>&1
        done
        kill $server; wait $server 2>/dev/null
      done ;;
    gpu-tests)
      timeout 400 python3 -m pytest -q tests/gpu -x > /tmp/job/gpu-tests.log 2>&1 ;;
    *) echo "unknown step $1" >> $P ;;
  esac
}
[ $# -eq 0 ] && set -- gpu-tests kernels span train-graphs decode train-default serve
step start; nvidia-smi --query-gpu=name --format=csv,noheader >> $P
for s in "$@"; do step "$s"; run_step "$s"; done
step done
