#!/usr/bin/env bash
# The README's main job: install what is needed (on a fresh machine too) and prune a tiny
# built-in model built from a config (random weights, no download). Arguments go to
# `token-prune demo`, e.g. `bash scripts/demo.sh --method alvts --keep-ratio 0.2`. When the small
# trained model's checkpoint is present, a plain run also demos it (see README, accuracy retention).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

install_package matplotlib
"$PYTHON" -m token_prune demo "$@"
# With the small trained model present (`token-prune train-small-lvlm --preset cpu`), also prune it on
# held-out samples of its task and save a picture of what was kept.
TRAINED="checkpoints/small_lvlm_cpu"
if [ "$#" -eq 0 ] && [ -f "$TRAINED/small_lvlm.json" ]; then
  echo
  "$PYTHON" -m token_prune demo --trained "$TRAINED" --method glimpse
fi
