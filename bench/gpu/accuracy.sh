#!/usr/bin/env bash
# Accuracy retention on the GPU, about 9 minutes on a fresh H100/H200: a small Qwen2.5-VL trained
# from scratch (train-small-lvlm --preset h100, within a wall-clock budget), GlimpsePrune's VIP
# trained on it, then held-out exact-match accuracy, unpatched and per pruning method:
#
#   bash bench/gpu/accuracy.sh --sha "$(git rev-parse HEAD)" OUTDIR
#   bash bench/gpu/accuracy.sh --dry-run OUTDIR
#
# Steps, each with its own timeout (bench/gpu/lib.sh):
#   train  train-small-lvlm --preset h100 --max-minutes 4, and beside it (niced, 4 jobs) the
#          extension's build, which training does not use (the kernels have no backward) but the
#          evaluation does
#   vip    VIP training through eval-accuracy on a few samples (GlimpsePrune only): it trains the
#          VIPs of the preset's layers and caches them in the checkpoint; their accuracy_vip.json
#          (seconds, steps) gives the time per step and in total
#   eval   eval-accuracy on 500 held-out samples with 4 pictures: every method at keep ratios
#          0.111 / 0.222 / 0.333 (the cached VIPs; ALVTS calibrated here)
# OUTDIR receives logs/, provenance.json, plan.tsv, steps.tsv, summary.md / .json, train/ (the
# model's small_lvlm.json and train_log.jsonl), vip/ (the VIP stamps and the small run's report),
# accuracy_h100.{json,md,png} and accuracy_h100_pictures/. The checkpoint stays in
# checkpoints/small_lvlm_<preset> (ACCURACY_CHECKPOINT). ACCURACY_PRESET=test, ACCURACY_SAMPLES=4
# and TOKEN_PRUNE_GPU_SKIP_BUILD=1 run the same pipeline on a CPU in a minute or two (a test does).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init accuracy 540 "$@"

plan_slot train 300
plan_slot vip 90
plan_slot eval 130
plan_done

PRESET="${ACCURACY_PRESET:-h100}"
CKPT="${ACCURACY_CHECKPOINT:-$REPO/checkpoints/small_lvlm_$PRESET}"

build_step spawn train nice -n 19 env MAX_JOBS=4
spawn_step train train-small-lvlm -- "$PY" -m token_prune train-small-lvlm --preset "$PRESET" --max-minutes 4 \
  --quiet --out "$CKPT"
join_slot train
collect "$CKPT/small_lvlm.json" "$CKPT/train_log.jsonl" "$OUT/train"

run_step vip -- "$PY" -m token_prune eval-accuracy "$CKPT" --methods glimpse --samples 16 --quiet \
  --out "$OUT/vip" --name vip_training
for stamp in "$CKPT"/vip_K*/accuracy_vip.json; do  # not the VIP weights
  collect "$stamp" "$OUT/vip/$(basename "$(dirname "$stamp")")"
done

run_step eval -- "$PY" -m token_prune eval-accuracy "$CKPT" --samples "${ACCURACY_SAMPLES:-500}" --pictures 4 --quiet \
  --out "$OUT"

gpu_finish
