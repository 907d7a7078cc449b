#!/usr/bin/env bash
# Update cost of every EvoRec-table method on a GPU, with a Llama-3.2-1B-shaped model built from
# config (RANDOM weights: the timings and parameter counts mean something, the quality numbers do not).
# Usage (from the repo root):
#   RECSIM_DATA=<data dir> OUT=<out dir> TOKENIZER=<tokenizer folder> [CAP=1024] bash benchmarks/gpu_update_cost.sh [methods...]
# CAP caps the training samples of every stage (trainer.max_train_samples); the default, null, trains
# on all of the sampled users' data, so re-training pays for the whole history as in the paper.
set -u
CAP=${CAP:-null}
METHODS=${*:-base finetune retrain evorec lsat ewc ftkl}
MODEL="backbone=tiny_llama backbone.name=llama32_1b_shape_random backbone.tiny.hidden_size=2048
  backbone.tiny.intermediate_size=8192 backbone.tiny.num_layers=16 backbone.tiny.num_heads=32
  backbone.tiny.num_kv_heads=8 backbone.lora.r=8 backbone.lora.alpha=16"
SCALE="dataset=beauty dataset.sample_users=1000 trainer.max_train_samples=$CAP trainer.batch_size=16
  eval.batch_size=64 trainer.progress_bar=false eval.n_boot=200 method.filters.sasrec.epochs=5"
for m in $METHODS; do
  extra=""; [ "$m" = evorec ] || extra=$(echo "$SCALE" | sed 's/method.filters.sasrec.epochs=5//')
  [ "$m" = evorec ] && extra="$SCALE"
  start=$(date +%s)
  python3 -m recsim.run method=$m $MODEL $extra ${TOKENIZER:+backbone.tokenizer_path=$TOKENIZER} \
    seed=1 hydra.run.dir=$OUT/gpu/$m > $OUT/gpu_$m.log 2>&1
  echo "method=$m rc=$? wall_s=$(( $(date +%s) - start ))"
done
python3 -m recsim.tables $OUT/gpu --out $OUT/gpu_summary --metrics HR@1,HR@3,NDCG@3 > /dev/null
