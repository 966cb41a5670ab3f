#!/usr/bin/env bash
# GlimpsePrune+ on the synthetic benchmark, h100 preset, on one lent GPU: unpatched, GlimpsePrune,
# GlimpsePrune+ and the RL-without-pruning control on 500 held-out samples.
#
#   bash bench/gpu/rl.sh OUTDIR             # on the GPU machine; results in OUTDIR/rl_h100.{json,md,png}
#   bash bench/gpu/rl.sh OUTDIR --dry-run   # the same commands with the `test` preset and tiny sizes (CPU, ~1 min)
#
# Every command below finishes in under 10 minutes (the GPU machines' per-command limit): training
# and each GRPO run stop on a wall-clock budget, and every stage is cached in OUTDIR, so a command
# that was cut short is simply run again. PYTHON selects the interpreter (needs token_prune[rl]).
set -euo pipefail
OUT="${1:?usage: bash bench/gpu/rl.sh OUTDIR [--dry-run]}"
MODE="${2:-}"
PY="${PYTHON:-python}"
if [ "$MODE" = "--dry-run" ]; then
  PRESET=test
  TRAIN=(--steps 20 --device cpu --threads 1)
  RL=(--steps 2 --prompts-per-step 2 --rows 8 --threads 1)
  SAMPLES=8
elif [ -z "$MODE" ]; then
  PRESET=h100
  TRAIN=(--max-minutes 8)
  RL=(--steps 400 --prompts-per-step 16 --rows 8000 --max-minutes 8)
  SAMPLES=500
else
  echo "rl.sh: unknown option $MODE (only --dry-run)" >&2
  exit 2
fi
CKPT="$OUT/small_lvlm_$PRESET"
mkdir -p "$OUT"
run() { echo "+ $*"; "$@"; }

if [ ! -f "$CKPT/small_lvlm.json" ]; then
  run "$PY" -m token_prune train-small-lvlm --preset "$PRESET" --out "$CKPT" --quiet "${TRAIN[@]}"
fi
for stage in vip rl_pruned rl_unpruned; do
  run "$PY" -m token_prune bench-rl "$CKPT" --stages "$stage" --out "$OUT" --name "rl_$PRESET" --no-progress "${RL[@]}"
done
run "$PY" -m token_prune bench-rl "$CKPT" --stages eval --samples "$SAMPLES" --out "$OUT" --name "rl_$PRESET" \
  --no-progress "${RL[@]}"
