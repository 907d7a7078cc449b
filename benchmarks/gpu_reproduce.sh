#!/usr/bin/env bash
# One scale's table runs on one GPU, many at once: the `base` run of every seed first (it trains and
# caches that seed's stage 0, shared by the other methods), then every other run in parallel, then the
# render (TABLES.md beside the paper's numbers). The run folders are recsim.reproduce's, so
# `python -m recsim.reproduce --render-only` reads them and a rerun skips what is DONE.
#   OUT=<out root> SCALE=cpu_gpu TABLES=evorec_main_beauty P=21 [GPUS=8] [ORDER="finetune evorec"] [PACK=<file.tgz>] \
#     [EXTRA="reuse_base_stage_across_versions=true"] bash benchmarks/gpu_reproduce.sh
# GPUS: devices to spread the runs over (default: every GPU nvidia-smi lists); a run in job slot s sees only
# GPU s mod GPUS (CUDA_VISIBLE_DEVICES), so P = GPUS puts one run on each. PACK: at the end, the run folders
# without weights (no *.safetensors, no adapter/) and candidates (candidates.npz: drawn again from the seed), the
# logs and TABLES.md in one tar, to bring back. ORDER: methods whose runs start first (the rest follow in the
# specs' order): when the lease may end before every run does, the runs the claims need finish first.
# Many runs share the machine's cores: each gets OMP_NUM_THREADS=2 unless set.
set -euo pipefail
OUT=${OUT:?output root}; SCALE=${SCALE:-cpu_gpu}; TABLES=${TABLES:-evorec_main_beauty}; P=${P:-21}
GPUS=${GPUS:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)}; GPUS=${GPUS:-1}; [ "$GPUS" -ge 1 ] || GPUS=1
export GPUS OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
rep=(python3 -m recsim.reproduce --scale "$SCALE" --tables "$TABLES" --out "$OUT")
mkdir -p "$OUT"
# EXTRA: overrides added to every run (before hydra.run.dir, which stays last), e.g. reuse_base_stage_across_versions=true
"${rep[@]}" --dry-run | grep -v '^#' | sed "s| hydra.run.dir=| ${EXTRA:+$EXTRA }hydra.run.dir=|" > "$OUT/commands.txt" || true
run_all() {  # run the command lines on stdin, $1 at a time, each into <run dir>.log, slot s on GPU s mod GPUS
  xargs -d '\n' -P "$1" --process-slot-var=SLOT -I{} bash -c 'export CUDA_VISIBLE_DEVICES=$(( SLOT % GPUS ));
    cmd="$1"; dir=${cmd##*hydra.run.dir=}; mkdir -p "$(dirname "$dir")";
    echo "# CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES $cmd" >> "$dir.log"; s=$(date +%s); eval "$cmd" >> "$dir.log" 2>&1 && echo "done $dir $(( $(date +%s) - s )) s" \
    || echo "FAILED $dir"' _ {}
}
{ grep -E '(^| )method=base( |$)' "$OUT/commands.txt" || true; } | run_all "$P"  # a table may have no base run
ordered() {  # stdin's command lines, those of the methods in ORDER first (in that order), then the rest
  local rest; rest=$(cat)
  for m in ${ORDER:-}; do
    grep -E "(^| )method=$m( |$)" <<<"$rest" || true
    rest=$(grep -vE "(^| )method=$m( |$)" <<<"$rest" || true)
  done
  printf '%s\n' "$rest"
}
{ grep -vE '(^| )method=base( |$)' "$OUT/commands.txt" || true; } | ordered | { grep -v '^$' || true; } | run_all "$P"
"${rep[@]}" --render-only > /dev/null
if [ -n "${PACK:-}" ]; then
  tar czf "$PACK" --exclude='*.safetensors' --exclude=adapter --exclude=candidates.npz -C "$OUT" .
fi
