#!/usr/bin/env bash
# The EvoRec λ curve and the EWC λ sweep with the pretrained SmolLM2-135M on one GPU, at a user sample
# large enough for >= 512 Fisher samples (the cpu scale has ~200 old samples in all).
#   PART=lambda|ewc OUT=<dir> USERS=600 bash benchmarks/gpu_lambda_ewc.sh
#   PART=ewc LAMS="1e5 1e6" JOBS=parallel ...   # a subset of the λ grid, one process per λ at once
# Needs the staged model (../shared/device/README.md): PYTHONPATH=/tmp/site:$PWD RECSIM_CACHE=/tmp/rcache.
# Every job of one PART shares stage 0 (trained once by `base`, cached under RECSIM_CACHE);
# docs/MEASURED.md has the figures. In parallel mode the small model leaves the GPU idle between kernels,
# so several processes share it; their update times then compare only with each other's, not with a lone run.
set -euo pipefail
PART=${PART:?lambda or ewc}; OUT=${OUT:?output dir}; USERS=${USERS:-600}; JOBS=${JOBS:-sweep}
common=(dataset=beauty "dataset.sample_users=$USERS" backbone=smollm2_135m trainer.progress_bar=false
        eval.validation=true eval.n_boot=200 eval.batch_size=64)
run_one() {  # <name> <overrides...>: one run into $OUT/$PART/<name>, its log beside it
  local name=$1; shift
  python3 -m recsim.run "${common[@]}" "$@" "hydra.run.dir=$OUT/$PART/$name" > "$OUT/$PART/$name.log" 2>&1
}
mkdir -p "$OUT/$PART"
case "$PART" in
  lambda) python3 -m recsim.run -m "${common[@]}" method=evorec method.lam=0,2e-5,2e-4,2e-3,2e-2,2e-1 "hydra.sweep.dir=$OUT/$PART"
          python3 -m recsim.run -m "${common[@]}" method=base,finetune "hydra.sweep.dir=$OUT/$PART" ;;
  ewc)    lams=${LAMS:-"1e2 1e3 1e4 1e5 1e6 1e7 1e8"}
          if [[ $JOBS == parallel ]]; then
            [[ -f $OUT/$PART/base/DONE ]] || run_one base method=base      # trains and caches stage 0 once
            pids=()
            for lam in $lams; do run_one "ewc_$lam" method=ewc "method.lam=$lam" & pids+=($!); done
            [[ -n ${WITH_FINETUNE:-} ]] && { run_one finetune method=finetune & pids+=($!); }
            for p in "${pids[@]}"; do wait "$p" || echo "job $p failed" >&2; done
          else
            python3 -m recsim.run -m "${common[@]}" method=ewc "method.lam=${lams// /,}" "hydra.sweep.dir=$OUT/$PART"
          fi ;;
  *) echo "PART must be lambda or ewc" >&2; exit 2 ;;
esac
