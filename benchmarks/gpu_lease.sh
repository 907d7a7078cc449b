#!/usr/bin/env bash
# One lease's measurements, run in the background (setsid) so they outlast the ~10-minute calls: the parts of
# gpu_bench.sh given in PARTS, then (UPDATE_COST=1) benchmarks/gpu_update_cost.sh for all 7 methods on the
# pretrained SmolLM2 (600 Beauty users, the settings of the earlier GPU ratio), each alone on the GPU.
#   OUT=/tmp/lease PARTS="static score64" UPDATE_COST=1 LATE_PARTS=decode setsid nohup bash benchmarks/gpu_lease.sh &
# Progress: $OUT/progress.log; $OUT/ALL_DONE at the end. Needs the staged environment of gpu_bench.sh.
# Staging (learnt the hard way, session 22): read `warm` in every reply; false means a fresh machine and /tmp is empty,
# so stage again from call 1. The join's sha256 file lives in .gpu_model/p3: carry p3 in the call that joins. Each
# monitoring call ends by tarring $OUT's results into the call's $OUT, so a machine lost later loses nothing earlier.
set -u
OUT=${OUT:?output dir}; mkdir -p "$OUT"
log() { echo "$(date +%H:%M:%S) $*" >> "$OUT/progress.log"; }
log "start: parts=${PARTS:-} update_cost=${UPDATE_COST:-0}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
for part in ${PARTS:-}; do
  log "part $part"
  OUT=$OUT/bench bash benchmarks/gpu_bench.sh "$part" >> "$OUT/bench.log" 2>&1
  log "part $part done"
done
if [ "${UPDATE_COST:-0}" = 1 ]; then
  log "update cost"
  BACKBONE=smollm2_135m USERS=${USERS:-600} OUT=$OUT/u EXTRA="eval.validation=false eval.kl_after_update=false" \
    bash benchmarks/gpu_update_cost.sh ${METHODS:-base finetune evorec retrain ewc ftkl lsat} >> "$OUT/update_cost.log" 2>&1
  log "update cost done"
fi
for part in ${LATE_PARTS:-}; do  # parts after the update cost (the least needed first if the lease runs out)
  log "part $part"
  OUT=$OUT/bench bash benchmarks/gpu_bench.sh "$part" >> "$OUT/bench.log" 2>&1
  log "part $part done"
done
touch "$OUT/ALL_DONE"; log "all done"
