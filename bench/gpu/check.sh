#!/usr/bin/env bash
# The GPU check of token_prune's CUDA kernels, one command that ends within 9 minutes on a fresh
# machine with one H100 or H200 (nvcc, torch 2.11+cu130, transformers 5.17, pytest and
# hypothesis preinstalled; nothing of ours installed; no network):
#
#   bash bench/gpu/check.sh --sha "$(git rev-parse HEAD)" OUTDIR    # on the GPU machine
#   bash bench/gpu/check.sh --dry-run OUTDIR                         # anywhere: checks every
#                                                                    # command line and the plan
#
# Steps, each with its own timeout (bench/gpu/lib.sh explains how unused time moves on):
#   build      the extension for the local arch only, MAX_JOBS = cores
#   pytest     pytest -m gpu over tests/ (fixed hypothesis seed, junit XML)
#   sanitizer  compute-sanitizer memcheck, racecheck and synccheck, side by side, on
#              bench/gpu/sanitize_ops.py (every kernel, odd sizes, ragged batches), our kernels only
#   kernels    bench/kernels.py at the Qwen2.5-VL-7B sizes against the PyTorch path and the copy
#              bandwidth
#   e2e_*      token_prune.bench on the full-size Qwen2.5-VL-7B with random weights: agreement
#              check, prefill / TTFT / decode latency of unpatched, GlimpsePrune K=18 and K=2 at
#              keep 0.074, FastV K=2 and ALVTS 0.11, with the kernels and again without them
# OUTDIR receives logs/, provenance.json, plan.tsv, steps.tsv, summary.md / .json, pytest-gpu.xml,
# kernels/ and e2e/ (JSON + Markdown). The exit status is 0 only if every step passed.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init check 540 "$@"

plan_slot build 130
plan_slot pytest 110
plan_slot sanitizer 70
plan_slot kernels 60
plan_slot e2e_kernels_on 90
plan_slot e2e_kernels_off 60
plan_done

build_step run build env MAX_JOBS="$(nproc)"

run_step pytest -- "$PY" -m pytest tests -m gpu -q -rfE -p no:cacheprovider --hypothesis-seed=0 \
  --durations=15 --junitxml="$OUT/pytest-gpu.xml"

# Only our kernels are instrumented (kns=token_prune); memcheck sees every tensor as its own
# allocation when the caching allocator is off, so an access past a tensor's end is caught.
SANITIZER="$(sanitizer_bin)"
for tool in memcheck racecheck synccheck; do
  spawn_step sanitizer "sanitizer-$tool" -- env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --kernel-name kns=token_prune --error-exitcode 9 --print-limit 100 \
    "$PY" bench/gpu/sanitize_ops.py
done
join_slot sanitizer

run_step kernels -- "$PY" bench/kernels.py --warmup 5 --repeats 20 --out-dir "$OUT/kernels" --tag check

E2E=(--preset qwen2_5_vl_7b_4k --only check,latency --no-sweep
     --setting glimpse:layer=18,keep_ratio=0.074 --setting glimpse:layer=2,keep_ratio=0.074
     --setting fastv:layer=2,keep_ratio=0.074 --setting alvts:keep_ratio=0.11
     --warmup 1 --repeats 3 --decode-warmup 1 --decode-repeats 2 --decode-tokens 16
     --no-plot --out-dir "$OUT/e2e")
run_step e2e_kernels_on -- "$PY" -m token_prune.bench "${E2E[@]}" --tag kernels-on
# The unpatched model runs no kernel: its row comes from the run above.
run_step e2e_kernels_off -- env TOKEN_PRUNE_KERNELS=0 "$PY" -m token_prune.bench "${E2E[@]}" --no-baseline \
  --tag kernels-off

gpu_finish
