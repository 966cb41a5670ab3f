#!/usr/bin/env bash
# Decode throughput and memory against batch size on the full-size Qwen2.5-VL-7B architecture
# (random weights, 4096 visual tokens per sample), about 5 minutes on a fresh H100/H200:
#
#   bash bench/gpu/decode_sweep.sh --sha "$(git rev-parse HEAD)" OUTDIR
#   bash bench/gpu/decode_sweep.sh --dry-run OUTDIR
#
# Steps, each with its own timeout (bench/gpu/lib.sh):
#   build   the extension for the local arch only
#   sweep   token_prune.bench, preset qwen2_5_vl_7b_4k: the agreement check (keep_ratio 1.0 against
#           the unpatched model), then for unpatched, GlimpsePrune K=18 keep 0.074, FastV K=2 keep
#           0.074 and ALVTS 0.11 skipped="drop", one generate per batch size 1, 2, 4, ..., 64 until
#           the first out-of-memory under a 70 GB cap; decode tokens/s, step time and peak memory,
#           and the largest batch each setting fits
# OUTDIR receives logs/, provenance.json, plan.tsv, steps.tsv, summary.md / .json and sweep/
# (the benchmark's JSON and Markdown, rewritten after every setting, so a timeout keeps what ran).
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
gpu_init decode_sweep 330 "$@"

plan_slot build 130
plan_slot sweep 180
plan_done

build_step run build env MAX_JOBS="$(nproc)"

# The preset's sweep settings are the four above; its latency phase is not run here.
run_step sweep -- "$PY" -m token_prune.bench --preset qwen2_5_vl_7b_4k --only check,sweep \
  --sweep-batches 1,2,4,8,16,32,64 --mem-cap-gb 70 --no-plot --out-dir "$OUT/sweep" --tag decode-sweep

gpu_finish
