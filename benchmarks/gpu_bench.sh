#!/usr/bin/env bash
# recsim.bench on one GPU (issue 12's figures), each variant one process, beside the plain-loop reference.
#   OUT=<dir> LIMIT=<path to lora_limit.py> bash benchmarks/gpu_bench.sh [part ...]
#   parts: limit train train1b score fullrank profile compiled score2 tables static graphs static1b score64 decode (default: the
#   first five); `tables`:
#   the gpu scale's own training setting (batch 16, eager) and its scoring pass (packed, 256 users), profiled,
#   with the fp32 pass's speed and how far bf16 moves the scores from it (bench.agreement), and compiled.
#   Each variant writes <OUT>/<name>.json + .log.
# Needs the staged SmolLM2 and Beauty (../shared/device/README.md): PYTHONPATH, RECSIM_CACHE, RECSIM_DATA.
set -uo pipefail
OUT=${OUT:?output dir}; mkdir -p "$OUT"
PARTS=${*:-limit train train1b score fullrank}
PROF=(bench.steps=10 bench.profile_steps=3)  # + bench.profile=<dir>: operator tables, host syncs (recsim.bench.profile)
BEAUTY=(dataset=beauty dataset.sample_users=5000 trainer.progress_bar=false)
FAST=(trainer.group_by_length=true trainer.log_every_n_steps=50)
L1B=(backbone=tiny_llama backbone.name=llama32_1b_shape_random backbone.dtype=bfloat16 backbone.tiny.hidden_size=2048
     backbone.tiny.intermediate_size=8192 backbone.tiny.num_layers=16 backbone.tiny.num_heads=32 backbone.tiny.num_kv_heads=8)
bench() {  # <name> <what> <overrides...>
  local name=$1 what=$2; shift 2
  echo "== $name: recsim.bench $what $*"
  timeout "${TMO:-300}" python3 -m recsim.bench "$what" "$@" "bench.out=$OUT/$name.json" > "$OUT/$name.log" 2>&1
  echo "rc=$?"; grep -E "samples/s|tokens/s|MFU|users/s|effective batch|peak memory|seconds|achieved" "$OUT/$name.log" | head -12
}
for part in $PARTS; do case $part in
  limit)   echo "== lora_limit smollm2 256x256 compile=1"
           timeout 200 python3 "${LIMIT:?path to lora_limit.py}" smollm2 256 256 1 2>&1 | tail -3 | tee -a "$OUT/lora_limit.log"
           echo "== lora_limit llama1b 64x256 compile=1"
           timeout 200 python3 "$LIMIT" llama1b 64 256 1 2>&1 | tail -3 | tee -a "$OUT/lora_limit.log" ;;
  train)   bench train_b32_eager train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=32            # today's path
           bench train_b16_gpu_scale train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}"
           bench train_b256 train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=256 "${FAST[@]}"
           bench train_b256_compile train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=256 "${FAST[@]}" \
             trainer.compile=true bench.warmup=5 ;;
  train1b) bench train_1b_b64_compile train "${L1B[@]}" "${BEAUTY[@]}" trainer.batch_size=64 "${FAST[@]}" \
             trainer.compile=true bench.warmup=5 ;;
  score)   for k in kv_repeat packed; do
             bench "score_${k}_b64" score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=$k eval.batch_size=64 bench.users=2048
           done
           bench score_packed_b256 score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed eval.batch_size=256 bench.users=4096 ;;
  profile) bench prof_b16_eager train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             "${PROF[@]}" bench.profile=$OUT/prof_b16_eager
           bench prof_b16_nodet train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             trainer.deterministic=false "${PROF[@]}" bench.profile=$OUT/prof_b16_nodet
           bench prof_score_packed_b256 score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed \
             eval.batch_size=256 bench.users=1024 bench.profile_steps=2 bench.profile=$OUT/prof_score_packed_b256 ;;
  score2)  bench score_packed_b512 score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed eval.batch_size=512 \
             bench.users=4096 bench.profile_steps=2 bench.profile=$OUT/prof_score_packed_b512 ;;
  compiled) for b in 16 64 256; do
             bench "train_b${b}_compile" train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=$b "${FAST[@]}" \
               trainer.compile=true trainer.pad_to_multiple_of=16 bench.warmup=8 "${PROF[@]}" bench.profile=$OUT/prof_b${b}_compile
           done
           bench train_b16_cudagraphs train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             trainer.compile=true trainer.compile_mode=reduce-overhead trainer.pad_to_multiple_of=32 bench.warmup=12 bench.steps=20 ;;
  tables)  bench score_packed_b256 score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed eval.batch_size=256 \
             bench.users=2048 bench.agreement=true bench.profile_steps=2 bench.profile=$OUT/prof_score_packed_b256
           bench score_packed_b256_compiled score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed \
             eval.batch_size=256 recipe.scoring.compile=true bench.users=2048 bench.warmup=4
           bench train_b16_gpu_scale train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" ;;
  static)  # trainer.static_shapes: one width a fit, so CUDA graphs (reduce-overhead) record once; beside this lease's eager
           bench train_b16_eager train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}"
           bench train_b16_compile_static train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             trainer.compile=true trainer.static_shapes=true trainer.pad_to_multiple_of=64 bench.warmup=8
           bench train_b16_graphs_static train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             trainer.compile=true trainer.compile_mode=reduce-overhead trainer.static_shapes=true \
             trainer.pad_to_multiple_of=64 bench.warmup=20 bench.steps=60
           bench train_b256_compile_static train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=256 "${FAST[@]}" \
             trainer.compile=true trainer.static_shapes=true trainer.pad_to_multiple_of=64 bench.warmup=5 ;;
  graphs)  # CUDA graphs over length buckets (widths padded to 64, one graph each, no static width): less padding
           bench train_b16_graphs_pad64 train backbone=smollm2_135m "${BEAUTY[@]}" trainer.batch_size=16 "${FAST[@]}" \
             trainer.compile=true trainer.compile_mode=reduce-overhead trainer.pad_to_multiple_of=64 \
             bench.warmup=40 bench.steps=80 ;;
  static1b) bench train_1b_b64_graphs_static train "${L1B[@]}" "${BEAUTY[@]}" trainer.batch_size=64 "${FAST[@]}" \
             trainer.compile=true trainer.compile_mode=reduce-overhead trainer.static_shapes=true \
             trainer.pad_to_multiple_of=64 bench.warmup=8 ;;
  score64) # scoring with packed widths padded to a multiple of 64 (recipe.scoring.pad_to_multiple_of=auto on a GPU),
           # with bf16's agreement with an fp32 pass (the share of users whose top-10 it keeps)
           bench score_packed_b256_pad64 score backbone=smollm2_135m "${BEAUTY[@]}" recipe.scoring.kernel=packed \
             eval.batch_size=256 bench.users=4096 bench.agreement=true ;;
  decode)  # issue 13: trie-constrained beam search etc. over Beauty's semantic IDs (recsim's RQ-VAE, cached), untrained
           # adapter: the times mean something, the Recall does not
           bench decode_semantic_b64 decode dataset=beauty dataset.sample_users=5000 recipe=generative item_id=semantic \
             trainer.progress_bar=false recipe.beam.batch_size=64 recipe.grounding.batch_size=64 bench.users=512 \
             bench.repeats=3 bench.warmup=1 ;;
  fullrank) bench fullrank_synthetic fullrank backbone=sasrec bench.synthetic_scores=true bench.users=20000 bench.items=12000 ;;
  *) echo "unknown part $part" >&2; exit 2 ;;
esac; done
