#!/usr/bin/env bash
# One lease's gpu-scale table runs, fastest path first, in the background (setsid) so they outlast the calls:
#   1. the `base` run of the first seed alone (it trains and caches that seed's stage 0);
#   2. `finetune` then `evorec` of that seed, each alone on the GPU: their update_seconds are the update-cost
#      comparison of issue 12 at the gpu scale (5,000 users), not a figure of runs sharing the GPU;
#   3. the other methods of that seed side by side (P at a time);
#   4. the next seeds (base first, then the rest side by side), as far as the lease goes.
# Every run takes FAST (CUDA graphs over static batch widths: `recsim.bench train` measured 223.8 samples/s at the
# gpu scale's batch of 16, 4.9x eager). A run that fails that way runs once more with FALLBACK (compiled blocks, no
# CUDA graphs), reusing the stage 0 trained under CUDA graphs (`reuse_base_stage_across_versions`: how a step runs
# changes a stage 0 by round-off only); its config.yaml says which it ran with, and progress.log says why.
# Output: $OUT/rep/<scale>/<dataset>/<run>/ (recsim.reproduce's folders), $OUT/progress.log, $OUT/rep/.../TABLES.md
# rendered after every phase. Needs the staged environment (PYTHONPATH=/tmp/site:<src>, RECSIM_CACHE, RECSIM_DATA).
#   OUT=/tmp/lease SEEDS="1 2 3" P=4 setsid nohup bash benchmarks/gpu_table_lease.sh > /tmp/driver.log 2>&1 &
# AFTER="<command>": run once every table run is done, e.g. AFTER="OUT=/tmp/lease/bench bash benchmarks/gpu_bench.sh graphs"
set -u
OUT=${OUT:?output dir}; REP=$OUT/rep; SCALE=${SCALE:-gpu}; TABLES=${TABLES:-evorec_main_beauty}
SEEDS=${SEEDS:-1 2 3}; P=${P:-4}; ALONE=${ALONE:-finetune evorec}
FAST=${FAST:-trainer.compile=true trainer.compile_mode=reduce-overhead trainer.static_shapes=true trainer.pad_to_multiple_of=64}
FALLBACK=${FALLBACK:-trainer.compile=true trainer.pad_to_multiple_of=64 reuse_base_stage_across_versions=true}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
mkdir -p "$REP"
log() { echo "$(date +%H:%M:%S) $*" >> "$OUT/progress.log"; }
rep=(python3 -m recsim.reproduce --scale "$SCALE" --tables "$TABLES" --out "$REP")
"${rep[@]}" --dry-run | grep -v '^#' > "$OUT/commands.txt"
log "start: $(wc -l < "$OUT/commands.txt") runs listed; seeds=$SEEDS P=$P; fast: $FAST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

command_of() {  # method seed -> that run's command line
  grep -E "(^| )method=$1( .*)? seed=$2 hydra\.run\.dir=" "$OUT/commands.txt" | head -1
}
run_one() {  # method seed: FAST, else FALLBACK once
  local line dir start
  line=$(command_of "$1" "$2"); [ -n "$line" ] || { log "no run for method=$1 seed=$2"; return; }
  dir=${line##*hydra.run.dir=}; mkdir -p "$(dirname "$dir")"
  [ -f "$dir/DONE" ] && { log "already done: $1 s$2"; return; }
  start=$(date +%s)
  if eval "${line/ hydra.run.dir=/ $FAST hydra.run.dir=}" > "$dir.log" 2>&1; then
    log "done $1 s$2 (fast) in $(( $(date +%s) - start )) s"; return
  fi
  log "FAILED fast $1 s$2 after $(( $(date +%s) - start )) s: $(grep -vE '^\s*$|HYDRA_FULL_ERROR' "$dir.log" | tail -4 | tr '\n' ' ' | cut -c1-500)"
  rm -rf "$dir.fast_failed"; mv "$dir" "$dir.fast_failed" 2>/dev/null; mv "$dir.log" "$dir.fast_failed.log"
  start=$(date +%s)
  if eval "${line/ hydra.run.dir=/ $FALLBACK hydra.run.dir=}" > "$dir.log" 2>&1; then
    log "done $1 s$2 (fallback) in $(( $(date +%s) - start )) s"
  else
    log "FAILED fallback $1 s$2: $(grep -vE '^\s*$|HYDRA_FULL_ERROR' "$dir.log" | tail -4 | tr '\n' ' ' | cut -c1-500)"
  fi
}
export -f run_one command_of log; export OUT FAST FALLBACK
render() { "${rep[@]}" --render-only > "$OUT/render.log" 2>&1; log "rendered ($1)"; }
methods() { awk '{for (i = 1; i <= NF; i++) if ($i ~ /^method=/) print substr($i, 8)}' "$OUT/commands.txt" | awk '!seen[$0]++'; }
side_by_side() {  # seed, methods...: P at a time
  local seed=$1; shift
  printf '%s\n' "$@" | xargs -P "$P" -I{} bash -c "run_one {} $seed"
}

first=${SEEDS%% *}
run_one base "$first"; render "base s$first"
for m in $ALONE; do run_one "$m" "$first"; done; render "alone s$first"
rest=$(methods | grep -vxE "base|${ALONE// /|}")
side_by_side "$first" $rest; render "seed $first"
for seed in ${SEEDS#"$first"}; do
  run_one base "$seed"
  side_by_side "$seed" $(methods | grep -vx base); render "seed $seed"
done
touch "$OUT/ALL_DONE"; log "all done"
if [ -n "${AFTER:-}" ]; then  # what the rest of the lease is for once the table runs are done (benchmarks)
  log "after: $AFTER"; (eval "$AFTER") > "$OUT/after.log" 2>&1; log "after done (rc $?)"
fi
