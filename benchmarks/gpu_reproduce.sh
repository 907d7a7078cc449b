#!/usr/bin/env bash
# One scale's table runs on one GPU, many at once: the `base` run of every seed first (it trains and
# caches that seed's stage 0, shared by the other methods), then every other run in parallel, then the
# render (TABLES.md beside the paper's numbers). The run folders are recsim.reproduce's, so
# `python -m recsim.reproduce --render-only` reads them and a rerun skips what is DONE.
#   OUT=<out root> SCALE=cpu_gpu TABLES=evorec_main_beauty P=21 bash benchmarks/gpu_reproduce.sh
set -euo pipefail
OUT=${OUT:?output root}; SCALE=${SCALE:-cpu_gpu}; TABLES=${TABLES:-evorec_main_beauty}; P=${P:-21}
rep=(python3 -m recsim.reproduce --scale "$SCALE" --tables "$TABLES" --out "$OUT")
mkdir -p "$OUT"
"${rep[@]}" --dry-run | grep -v '^#' > "$OUT/commands.txt" || true
run_all() {  # run the command lines on stdin, $1 at a time, each into <run dir>.log
  xargs -d '\n' -P "$1" -I{} bash -c 'cmd="$1"; dir=${cmd##*hydra.run.dir=}; mkdir -p "$(dirname "$dir")";
    echo "# $cmd" >> "$dir.log"; s=$(date +%s); eval "$cmd" >> "$dir.log" 2>&1 && echo "done $dir $(( $(date +%s) - s )) s" \
    || echo "FAILED $dir"' _ {}
}
grep -E '(^| )method=base( |$)' "$OUT/commands.txt" | run_all "$P"
grep -vE '(^| )method=base( |$)' "$OUT/commands.txt" | run_all "$P"
"${rep[@]}" --render-only > /dev/null
