#!/usr/bin/env bash
# Run `memlm bench` on two source trees one after the other on the same GPU, for a before/after
# comparison of a change (issue 18 asks every bench row within 5%):
#   scripts/bench_two_trees.sh BEFORE_TREE AFTER_TREE OUT_DIR [bench options...]
# Each tree is a directory holding the `memlm` and `memlm_bench` packages
# (e.g. `git archive REV memlm memlm_bench | tar -x -C DIR`; before the move, `memlm` alone).
# Writes OUT_DIR/{before,after}.json (the bench's JSON result) and .log.
set -uo pipefail
before=$1 after=$2 out=$3
shift 3
mkdir -p "$out"
for side in before after; do
  tree=${!side}
  echo "== $side: $tree ($(date -u +%H:%M:%S))"
  (cd "$tree" && PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 -m memlm bench --json "$@") \
    >"$out/$side.log" 2>&1
  tail -n 1 "$out/$side.log" >"$out/$side.json"
  grep -E "tok/s|tokens/s" "$out/$side.log" | tail -n 20
done
