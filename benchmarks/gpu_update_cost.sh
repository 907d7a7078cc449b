#!/usr/bin/env bash
# Update cost of every EvoRec-table method on one GPU: wall time of each method's update (round 1),
# trainable parameters, peak GPU memory, and the ratio to fine-tuning's update.
# Two models (BACKBONE):
#   llama1b_random (default): a Llama-3.2-1B-shaped model built from config, RANDOM weights: the timings
#     and parameter counts mean something, the quality numbers do not. Beauty, 1,000 sampled users.
#   smollm2_135m: the pretrained SmolLM2-135M, Beauty, USERS sampled users (default 600), the settings of
#     the λ curve in docs/MEASURED.md (trainer defaults, eval.validation=true, 200 bootstrap draws).
# Usage (from the repo root; staged as ../shared/device/README.md, e.g. PYTHONPATH=/tmp/site:$PWD):
#   RECSIM_DATA=<data dir> RECSIM_CACHE=<cache dir> OUT=<out dir> [TOKENIZER=<tokenizer folder>] [CAP=1024] \
#     [BACKBONE=smollm2_135m] [USERS=600] bash benchmarks/gpu_update_cost.sh [methods...]
# methods: base finetune retrain ewc ftkl lsat evorec (the default: all 7), and evorec_ref = EvoRec with
# method.kl.cache_frozen=false (L_c's per-step reference passes: the cost before they were prepared once).
# Stage 0 is trained once, by the first method, and shared by the others (reuse_base_stage, cached under
# RECSIM_CACHE), so every run's update starts from the same model; `base` goes first so that stage 0's
# training is not inside another method's wall time. CAP caps the training samples of every stage
# (trainer.max_train_samples); the default, null, trains on all of the sampled users' data, so
# re-training pays for the whole history as in the paper. EXTRA: more overrides for every run.
# Output: $OUT/gpu[_smollm2_135m]/<method>/ (run folders), beside it _<method>.log, _update_cost.md (the table)
# and _summary (recsim.tables).
set -u
CAP=${CAP:-null}
BACKBONE=${BACKBONE:-llama1b_random}
METHODS=${*:-base finetune retrain ewc ftkl lsat evorec}
case "$BACKBONE" in
  llama1b_random|llama32_1b_shape_random)
    DIR=$OUT/gpu
    MODEL="backbone=tiny_llama backbone.name=llama32_1b_shape_random backbone.tiny.hidden_size=2048
      backbone.tiny.intermediate_size=8192 backbone.tiny.num_layers=16 backbone.tiny.num_heads=32
      backbone.tiny.num_kv_heads=8 backbone.lora.r=8 backbone.lora.alpha=16"
    SCALE="dataset=beauty dataset.sample_users=1000 trainer.max_train_samples=$CAP trainer.batch_size=16
      eval.batch_size=64 trainer.progress_bar=false eval.n_boot=200"
    EVOREC="method.filters.sasrec.epochs=5" ;;
  smollm2_135m)
    DIR=$OUT/gpu_smollm2_135m
    MODEL="backbone=smollm2_135m"
    SCALE="dataset=beauty dataset.sample_users=${USERS:-600} trainer.max_train_samples=$CAP trainer.progress_bar=false
      eval.validation=true eval.n_boot=200 eval.batch_size=64"
    EVOREC="" ;;
  *) echo "BACKBONE must be llama1b_random or smollm2_135m, not $BACKBONE" >&2; exit 2 ;;
esac
mkdir -p "$DIR"
for m in $METHODS; do
  case "$m" in
    evorec) args="method=evorec $EVOREC" ;;
    evorec_ref) args="method=evorec $EVOREC method.kl.cache_frozen=false" ;;
    *) args="method=$m" ;;
  esac
  start=$(date +%s)
  python3 -m recsim.run $args $MODEL $SCALE ${TOKENIZER:+backbone.tokenizer_path=$TOKENIZER} ${EXTRA:-} \
    seed=1 hydra.run.dir=$DIR/$m > ${DIR}_$m.log 2>&1
  echo "method=$m rc=$? wall_s=$(( $(date +%s) - start ))"
done
# the update of round 1 of every method, from its efficiency.json
python3 - "$DIR" $METHODS <<'EOF' | tee "${DIR}_update_cost.md"
import json, sys
from pathlib import Path
out, methods = Path(sys.argv[1]), sys.argv[2:]
eff = {}
for m in methods:
    f = out / m / "stages" / "01_update1" / "efficiency.json"
    if f.is_file():
        eff[m] = json.loads(f.read_text())
ft = eff.get("finetune", {}).get("update_seconds")
print("| method | update samples | trainable params | update s | ÷ finetune | peak mem (MiB) | notes |")
print("|---|---:|---:|---:|---:|---:|---|")
for m, e in eff.items():
    s = e.get("update_seconds", 0.0)
    notes = []
    if "filter_seconds" in e:
        notes.append(f"filter {e['filter_seconds']:.1f} s")
    if e.get("offline_seconds"):
        notes.append(f"not counted: filter pre-training {e['offline_seconds']:.1f} s (alongside; wall {e['wall_seconds']:.1f} s)")
    if "located_layers" in e:
        notes.append(f"layers {e['located_layers']}")
    if "kl_pool" in e:
        notes.append("L_c pool " + ", ".join(f"{k}={v}" for k, v in e["kl_pool"].items()))
    ratio = f"{s / ft:.2f}" if ft and s else "-"
    print(f"| {m} | {e.get('train_samples', 0)} | {e.get('trainable_params', 0):,} | {s:.1f} | {ratio} "
          f"| {e.get('peak_mem_mb', 0):,.0f} | {'; '.join(notes)} |")
EOF
python3 -m recsim.tables $DIR --out ${DIR}_summary --metrics HR@1,HR@3,NDCG@3 > /dev/null
