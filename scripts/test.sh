#!/usr/bin/env bash
# The project's test command: installs what the tests need (on a fresh machine too), builds the
# extension in place and runs pytest. Arguments go to pytest:
#
#   bash scripts/test.sh                      # everything, on the newest allowed transformers
#   bash scripts/test.sh tests/test_ops.py -x
#   TOKEN_PRUNE_TRANSFORMERS=lowest bash scripts/test.sh   # the lowest allowed release
#   TOKEN_PRUNE_TRANSFORMERS=5.25.0 bash scripts/test.sh   # a release outside the range, to try it
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/common.sh

# The rl extra (trl, peft) too, so that the GlimpsePrune+ tests run rather than skip.
mapfile -t RL_EXTRA < <(extra rl)
install_package pytest hypothesis matplotlib "${RL_EXTRA[@]}"
echo "test.sh: $("$PYTHON" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}")')"

rc=0
"$PYTHON" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
