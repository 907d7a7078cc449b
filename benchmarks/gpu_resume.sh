#!/usr/bin/env bash
# Continue a scale's tables on a fresh GPU machine, a later session's part of runs spread over sessions:
# the finished runs come back from an earlier PACK (so they are skipped), the earlier session's cached stage-0
# folders (base_stage/<key>/, adapters included) go back into RECSIM_CACHE, run folders without DONE are
# dropped (their weights were never packed, so they cannot resume), and gpu_reproduce.sh runs the rest with
# reuse_base_stage_across_versions=true: every run of a seed starts from the same stage 0 as the finished ones.
#   RUNS=<earlier PACK .tgz> STAGE0=<folder holding base_stage/> OUT=/tmp/rep SCALE=gpu TABLES=evorec_main_beauty \
#     [P=13] [ORDER=...] [PACK=<file.tgz>] bash benchmarks/gpu_resume.sh
set -euo pipefail
OUT=${OUT:?output root}; RUNS=${RUNS:?earlier pack}; STAGE0=${STAGE0:?folder holding base_stage/}
CACHE=${RECSIM_CACHE:?RECSIM_CACHE}
mkdir -p "$OUT" "$CACHE/base_stage"
tar xzf "$RUNS" -C "$OUT"
cp -r "$STAGE0"/base_stage/. "$CACHE/base_stage/"
for dir in "$OUT"/*/*/*/; do  # <out>/<scale>/<dataset>/<run>/
  [ -f "$dir/DONE" ] || { echo "unfinished, launched again: $dir"; rm -rf "$dir"; }
done
echo "finished runs kept: $(ls "$OUT"/*/*/*/DONE 2>/dev/null | wc -l); cached stage 0s: $(ls "$CACHE/base_stage" | wc -l)"
EXTRA="reuse_base_stage_across_versions=true${EXTRA:+ $EXTRA}" exec bash "$(dirname "$0")/gpu_reproduce.sh"
