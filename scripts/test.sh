#!/usr/bin/env bash
# The project's test command: installs what the tests need (on a fresh machine
# too), builds the extension in place and runs pytest. Arguments go to pytest:
#
#   bash scripts/test.sh                      # everything
#   bash scripts/test.sh tests/test_ops.py -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

if ! "$PYTHON" -c 'import torch' > /dev/null 2>&1; then
  echo "test.sh: torch is missing; installing torch==2.13.0"
  "$PYTHON" -m pip install -q torch==2.13.0
fi
"$PYTHON" - <<'PY'
import sys

import torch

major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if (major, minor) < (2, 11):
    sys.exit(f"test.sh: torch {torch.__version__} is too old; token_prune needs torch>=2.11")
PY

"$PYTHON" -m pip install -q "setuptools>=64" wheel ninja \
  "transformers>=5.17" safetensors tqdm numpy pytest hypothesis matplotlib
# Without build isolation: the extension must be compiled against this torch.
"$PYTHON" -m pip install -q --no-build-isolation -e .

rc=0
"$PYTHON" -m pytest -q "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "test.sh: pytest collected no tests; that is a failure here" >&2
  exit 1
fi
exit "$rc"
