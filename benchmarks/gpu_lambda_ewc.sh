#!/usr/bin/env bash
# The EvoRec λ curve and the EWC λ sweep with the pretrained SmolLM2-135M on one GPU, at a user sample
# large enough for >= 512 Fisher samples (the cpu scale has ~200 old samples in all).
#   PART=lambda|ewc OUT=<dir> USERS=600 bash benchmarks/gpu_lambda_ewc.sh
# Needs the staged model (../shared/device/README.md): PYTHONPATH=/tmp/site:$PWD RECSIM_CACHE=/tmp/rcache.
# Every job of one PART shares stage 0 (trained once, cached under RECSIM_CACHE); docs/MEASURED.md has the figures.
set -euo pipefail
PART=${PART:?lambda or ewc}; OUT=${OUT:?output dir}; USERS=${USERS:-600}
common=(dataset=beauty "dataset.sample_users=$USERS" backbone=smollm2_135m trainer.progress_bar=false
        eval.validation=true eval.n_boot=200 eval.batch_size=64 "hydra.sweep.dir=$OUT/$PART")
case "$PART" in
  lambda) python3 -m recsim.run -m "${common[@]}" method=evorec method.lam=0,2e-5,2e-4,2e-3,2e-2,2e-1
          python3 -m recsim.run -m "${common[@]}" method=base,finetune ;;
  ewc)    python3 -m recsim.run -m "${common[@]}" method=ewc method.lam=1e2,1e3,1e4,1e5,1e6,1e7,1e8 ;;
  *) echo "PART must be lambda or ewc" >&2; exit 2 ;;
esac
