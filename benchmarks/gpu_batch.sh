#!/usr/bin/env bash
# The GPU measurements behind docs/PERFORMANCE.md's issue-12/13/14 tables, in parts that each fit one 10-minute
# command on one GPU machine (one H200 here). Run from the repo root with ray + deepspeed (and, for the levers and
# QLoRA rows, liger_kernel + bitsandbytes) importable; logs and result lines go to $OUT (default ./gpu_out).
#
#   bash benchmarks/gpu_batch.sh tests     # build the 2.21 B workload model, tests/gpu (kernels, QLoRA), kernel_levers.py
#   bash benchmarks/gpu_batch.sh levers    # real path: every lever on, QLoRA (NF4) at the same engine, Liger off
#   bash benchmarks/gpu_batch.sh v46       # MiniCPM-V 4.6 / 4.7 (4.6 dims) training steps, no Ray (needs transformers
#                                          # >= 5.19 importable: carry its wheel instead of ray + deepspeed)
#   bash benchmarks/gpu_batch.sh v46ray    # the same model through the real path (Ray + DeepSpeed + transformers >= 5.19)
#   bash benchmarks/gpu_batch.sh launcher  # the same train loop under Ray Train and under torchrun
#   bash benchmarks/gpu_batch.sh attention # tests/gpu kernels, then the real path with cuDNN / flash SDPA / varlen vision
#   bash benchmarks/gpu_batch.sh targets   # issue 12 must-show rows: Ray vs torchrun (same loop), seed-like settings
#   bash benchmarks/gpu_batch.sh profile   # where a step's time goes: `train --profile` of levers_cudnn (real path),
#                                          # then train_step.py profiled under Ray Train and under torchrun
#   bash benchmarks/gpu_batch.sh syncs     # profile of levers_flash; DeepSpeed's per-tensor syncs fixed vs not; ZeRO-3
#                                          # with every parameter persistent
#   bash benchmarks/gpu_batch.sh fixes     # benchmarks/optimizer_step.py (every ZeRO stage, ds_fixes off/on), then the
#                                          # recommended recipe, ds_fixes off, ZeRO-3 seed-like persistent / default
#   bash benchmarks/gpu_batch.sh leaves    # Ray vs torchrun (same loop), seed-like with / without ZeRO-3 leaf layers
#   bash benchmarks/gpu_batch.sh vleaves   # seed-like with decoder + vision layers as leaves / per module
#   bash benchmarks/gpu_batch.sh launcher2 # Ray vs torchrun (same loop) in both orders
#   bash benchmarks/gpu_batch.sh recipe    # recommended, recommended + compiled vision layers, varlen_off, fused_ce_off
#   bash benchmarks/gpu_batch.sh host3     # recipe (compiled), seed_like, seed_like + compiled vision (split q/k/v runs,
#                                          # torch's linear under ZeRO-3 with recompute, DeepSpeed host fixes)
#   bash benchmarks/gpu_batch.sh host3b    # tests/gpu (QLoRA skips without bitsandbytes), then seed_like with DeepSpeed's own linear
#   bash benchmarks/gpu_batch.sh profile2  # `train --profile` of seed_like (ZeRO-3, 55 leaves), then of recommended_compiled
#   bash benchmarks/gpu_batch.sh pin       # profile of recommended_compiled (kernels by launch site), then the recipe with
#                                          # pinned (default) and pageable micro-batches
#   bash benchmarks/gpu_batch.sh chunk     # packed crops in vision_batch_size chunks vs one tower call; pinned-batch test
#   bash benchmarks/gpu_batch.sh ab        # the recipe under earlier code trees and this one, in one call:
#                                          # TREES="name=path ..." (each a `git archive <commit> raytune_minicpmv
#                                          # benchmarks` unpacked, e.g. under .gpu/), then this checkout as "head";
#                                          # PROFILE=1 profiles head's recipe after them
#
# Work folders live under .gpuwork/ (git-ignored), so a later part on the same machine reuses the model and rows.
set -u
OUT=${OUT:-$PWD/gpu_out}
W=${W:-$PWD/.gpuwork}
mkdir -p "$OUT" "$W"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export RAY_USAGE_STATS_ENABLED=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/card.txt"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" | tee -a "$OUT/card.txt"

# The same train loop (benchmarks/train_step.py, ZeRO-0 LoRA, micro-batch 4 x 1,024 tokens) under Ray Train, then
# torchrun, at 12 CPU threads each: launcher_pair TIMEOUT_S ARGS... (each log also in $OUT/train_step_<launcher>.log)
launcher_pair() {
  local limit=$1; shift
  python3 benchmarks/train_step.py build --model "$W/ts_model" 2>&1 | tail -1
  for l in ${ORDER:-ray torchrun}; do  # ORDER="torchrun ray": the other order
    if [ $l = torchrun ]; then run="env OMP_NUM_THREADS=12 torchrun --nproc_per_node 1 benchmarks/train_step.py torchrun"
    else run="python3 benchmarks/train_step.py ray"; fi
    timeout "$limit" $run --model "$W/ts_model" --trainable lora --zero 0 --no-grad-ckpt --micro-batch 4 --seq 1024 \
      --cpus-per-worker 12 "$@" 2>&1 | tee "$OUT/train_step_$l.log" \
      | awk '/profile of/ {n = 46} n > 0 {print; n--; next} /RESULT|fit wall/ {print substr($0, 1, 300)}'
  done
}

case "${1:-}" in
  tests)
    python3 benchmarks/kernel_levers.py --build "$W/model" 2>&1 | tail -2
    timeout 200 python3 -m pytest -m gpu tests/gpu/test_qlora_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_qlora_gpu.log" | tail -15
    timeout 150 python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_kernels_gpu.log" | tail -15
    timeout 200 python3 benchmarks/kernel_levers.py --model "$W/model" --out "$OUT/kernels_gpu.jsonl" 2>&1 | grep -v Loading | tail -12
    ;;
  levers)
    timeout 580 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_levers_gpu.jsonl" \
      --settings levers_on,qlora_levers_on,liger_off --budget-s 400 2>&1 | grep -v "Loading\|shards" | tail -20
    ;;
  v46)
    for a in "minicpmv4_6 4" "minicpmv4_6 8" "minicpmv4_7 4"; do
      set -- $a
      timeout 200 python3 benchmarks/v4_step.py --family $1 --micro-batch $2 --records 64 --work "$W/v4" \
        --out "$OUT/v4_step_gpu.jsonl" 2>&1 | grep -v "Loading\|shards" | tail -3
    done
    ;;
  v46ray)
    timeout 580 python3 benchmarks/real_path.py --family minicpmv4_6 --work "$W/v46" --logs "$OUT/logs46" \
      --out "$OUT/real_path_v46_gpu.jsonl" --settings recommended,zero2_mb2 --budget-s 380 2>&1 \
      | grep -v "Loading\|shards" | tail -20
    ;;
  launcher)
    launcher_pair 240 --steps 15 --warmup 5 --tag launcher --out "$OUT/train_step_launcher_gpu.jsonl"
    ;;
  attention)
    timeout 90 python3 -m pytest -m gpu tests/gpu/test_kernels_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/test_kernels_gpu.log" | tail -6
    timeout 480 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_attention_gpu.jsonl" \
      --settings levers_varlen,levers_cudnn,levers_flash --budget-s 350 2>&1 | grep -v "Loading\|shards" | tail -8
    ;;
  targets)
    launcher_pair 110 --steps 15 --warmup 5 --tag launcher2 --out "$OUT/train_step_launcher_gpu.jsonl"
    timeout 390 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_targets_gpu.jsonl" \
      --settings seed_like --budget-s 250 2>&1 | grep -v "Loading\|shards" | tail -5
    ;;
  profile)
    # levers_cudnn: the profile docs/PERFORMANCE.md "Attention kernels" reads (`--profile levers_on`: today's default)
    timeout 330 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_profile_gpu.jsonl" \
      --settings "" --profile levers_cudnn 2>&1 | grep -v "Loading\|shards" | tail -70
    launcher_pair 120 --steps 10 --warmup 3 --profile-steps 5 --tag profile --out "$OUT/train_step_profile_gpu.jsonl"
    ;;
  syncs)
    # train/ds_fixes.py: the profile of levers_flash (host syncs by caller), the fix's A/B, ZeRO-3 all persistent
    timeout 585 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_syncs_gpu.jsonl" \
      --settings levers_flash_ds_unfixed,levers_flash,seed_like_persist --profile levers_flash --budget-s 430 \
      --deadline-s 575 2>&1 | grep -v "Loading\|shards" | tail -90
    ;;
  fixes)
    # DeepSpeed's optimizer paths alone (no model, no Ray; beside the workload build, which barely uses the GPU),
    # then the real path: the recommended recipe, the same with train/ds_fixes.py off, ZeRO-3 all persistent
    (timeout 240 python3 benchmarks/optimizer_step.py --profile-stage 3 --out "$OUT/optimizer_step_gpu.jsonl" \
      > "$OUT/optimizer_step.log" 2>&1 &)
    timeout 590 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_fixes_gpu.jsonl" \
      --settings recommended,levers_flash_ds_unfixed,seed_like_persist,seed_like --budget-s 400 --deadline-s 578 \
      2>&1 | grep -v "Loading\|shards" | tail -12
    grep "ZeRO-" "$OUT/optimizer_step.log"
    ;;
  leaves)
    # Ray vs torchrun with train/ds_fixes.py; the seed-like settings with ZeRO-3 gathering whole decoder layers
    # (deepspeed.zero3_leaf_layers, default) and per module (the `leaves` call's leaf row is void: the vision layers
    # were leaves then, docs/PERFORMANCE.md "DeepSpeed's per-tensor work")
    launcher_pair 100 --steps 12 --warmup 4 --tag launcher3 --out "$OUT/train_step_launcher_gpu.jsonl"
    timeout 480 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_leaves_gpu.jsonl" \
      --settings seed_like,seed_like_per_module --budget-s 300 --deadline-s 470 2>&1 | grep -v "Loading\|shards" | tail -6
    ;;
  vleaves)
    # the seed-like settings with every decoder AND vision encoder layer gathered whole (the packed vision path
    # calls each layer as a module now) vs DeepSpeed's per-module gathering (builds the workload if missing)
    timeout 560 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_vleaves_gpu.jsonl" \
      --settings seed_like,seed_like_per_module --budget-s 400 --deadline-s 550 2>&1 | grep -v "Loading\|shards" | tail -6
    ;;
  launcher2)
    # Ray vs torchrun (same loop), in both orders: each launcher runs once first and once second
    launcher_pair 100 --steps 12 --warmup 4 --tag launcher4a --out "$OUT/train_step_launcher_gpu.jsonl"
    ORDER="torchrun ray" launcher_pair 100 --steps 12 --warmup 4 --tag launcher4b --out "$OUT/train_step_launcher_gpu.jsonl"
    ;;
  recipe)
    # the recommended recipe, the same with compiled vision layers, and the two lever rows not yet run
    timeout 590 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_recipe_gpu.jsonl" \
      --settings recommended,recommended_compiled,varlen_off,fused_ce_off --budget-s 430 --deadline-s 578 2>&1 \
      | grep -v "Loading\|shards" | tail -10
    ;;
  host3)
    timeout 585 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_host3_gpu.jsonl" \
      --settings recommended_compiled,seed_like,seed_like_compiled --budget-s 420 --deadline-s 578 2>&1 \
      | grep -v "Loading\|shards" | tail -6
    ;;
  host3b)
    timeout 240 python3 -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rs 2>&1 | tee "$OUT/tests_gpu.log" | tail -8
    timeout 280 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_host3_gpu.jsonl" \
      --settings seed_like_mel --deadline-s 275 2>&1 | grep -v "Loading\|shards" | tail -3
    ;;
  pin)
    # where the recipe's step goes (kernel time by launch site, syncs by autograd node), then micro-batches pinned in
    # the collate thread (train.pin_memory, default on) vs pageable, in one call
    timeout 585 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_pin_gpu.jsonl" \
      --settings recommended_compiled,recommended_unpinned --profile recommended_compiled --budget-s 330 \
      --deadline-s 578 2>&1 | grep -v "Loading\|shards" | grep -v "^(RayTrainWorker" | tail -8
    ;;
  chunk)
    # packed crops in chunks of vision_batch_size (the old path) vs one vision-tower call per batch (the new
    # default), then the pinned-batch GPU test
    timeout 470 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_chunk_gpu.jsonl" \
      --settings recommended_chunked,recommended_compiled --deadline-s 465 2>&1 | grep -v "Loading\|shards" \
      | grep -v "^(RayTrainWorker" | tail -4
    timeout 60 python3 -m pytest -m gpu tests/gpu/test_train_gpu.py -k pinned -q -p no:cacheprovider 2>&1 | tail -3
    ;;
  profile2)
    # where the seed-like step (host-bound at micro-batch 2) and the recipe's step go, on today's code
    timeout 200 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --settings "" 2>&1 | grep "ready\|rc="
    for s in seed_like recommended_compiled; do
      timeout 195 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_profile2_gpu.jsonl" \
        --settings "" --profile $s --deadline-s 190 2>&1 | grep -v "Loading\|shards" | grep -A75 "profile of" | head -75
    done
    ;;
  ab)
    # one setting (AB_SETTING, default the recipe) under each earlier tree, then this checkout, one machine: the code
    # change's effect as a ratio inside one call (the cards differ by up to 30 %); each row tagged with its tree
    timeout 200 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --settings "" 2>&1 | grep "ready\|rc="
    for tree in ${TREES:-} head="$PWD"; do
      name=${tree%%=*}; dir=${tree#*=}
      timeout ${AB_RUN_S:-170} python3 "$dir/benchmarks/real_path.py" --work "$W" --logs "$OUT/logs_$name" \
        --tokenizer "$PWD/tests/assets/minicpmv26_tokenizer" --out "$OUT/real_path_ab_$name.jsonl" \
        --settings "${AB_SETTING:-recommended_compiled}" --deadline-s $(( ${AB_RUN_S:-170} - 5 )) 2>&1 \
        | grep -v "Loading\|shards" | grep -v "^(RayTrainWorker" | tail -2 | sed "s/^/[$name] /"
    done
    if [ -n "${PROFILE:-}" ]; then
      timeout 190 python3 benchmarks/real_path.py --work "$W" --logs "$OUT/logs" --out "$OUT/real_path_ab_profile.jsonl" \
        --settings "" --profile "${AB_SETTING:-recommended_compiled}" --deadline-s 185 2>&1 | grep -v "Loading\|shards" \
        | grep -A90 "profile of" | head -90
    fi
    ;;
  *) echo "usage: $0 tests|levers|v46|v46ray|launcher|attention|targets|profile|syncs|fixes|leaves|vleaves|launcher2|recipe|host3|host3b|profile2|pin|chunk|ab"
     exit 2 ;;
esac
