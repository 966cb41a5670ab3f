# Sourced by the project's scripts: which Python to use, and what to install with it.
# The requirements come from pyproject.toml, so the scripts can never allow another range than
# the package declares.

PYTHON="${PYTHON:-python}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
REPO="${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"

# requirement NAME: the requirement pyproject.toml declares for NAME, e.g. "transformers>=5.17,<5.25".
requirement() {
  local req
  req="$(sed -n "s/^ *\"\($1\([<>=!~][^\"]*\)\?\)\",\{0,1\}$/\1/p" "$REPO/pyproject.toml" | head -n 1)"
  [ -n "$req" ] || { echo "common.sh: no requirement for $1 in pyproject.toml" >&2; return 1; }
  echo "$req"
}

# extra NAME: the requirements of the optional extra NAME in pyproject.toml, one per line.
extra() {
  sed -n "s/^$1 = \[\(.*\)\]$/\1/p" "$REPO/pyproject.toml" | tr ',' '\n' | sed 's/^ *"//; s/" *$//' | grep -v '^$'
}

# transformers_requirement: the declared range, or what TOKEN_PRUNE_TRANSFORMERS asks for:
#   lowest   the lowest allowed release (CI tests it)
#   newest   the newest allowed release (the default; CI tests it too)
#   X.Y.Z    exactly that release, e.g. one above the range, to try it before raising the bound
transformers_requirement() {
  local range="$(requirement transformers)" want="${TOKEN_PRUNE_TRANSFORMERS:-newest}"
  case "$want" in
    newest) echo "$range" ;;
    lowest) echo "transformers==$(echo "$range" | sed -n 's/.*>=\([0-9.]*\).*/\1/p')" ;;
    *) echo "transformers==$want" ;;
  esac
}

# ensure_torch: a torch build to compile against. A CPU build (a local wheel, seconds) when none
# is installed; an existing build, CUDA or not, is kept.
ensure_torch() {
  if ! "$PYTHON" -c 'import torch' > /dev/null 2>&1; then
    echo "$(basename "$0"): torch is missing; installing torch==2.13.0 (CPU build)"
    "$PYTHON" -m pip install -q torch==2.13.0 numpy  # numpy too, or importing torch warns
  fi
  "$PYTHON" - <<'PY'
import sys

import torch

major, minor = (int(x) for x in torch.__version__.split("+")[0].split(".")[:2])
if (major, minor) < (2, 11):
    sys.exit(f"torch {torch.__version__} is too old; token_prune needs torch>=2.11")
PY
}

# install_package EXTRA...: the runtime requirements plus EXTRA, then token_prune itself
# (editable, compiled against the installed torch). --no-deps: the requirements are installed
# here, so that TOKEN_PRUNE_TRANSFORMERS can pick a release outside the declared range.
install_package() {
  ensure_torch
  "$PYTHON" -m pip install -q "setuptools>=64" wheel ninja "$(transformers_requirement)" \
    safetensors tqdm numpy "$@"
  "$PYTHON" -m pip install -q --no-build-isolation --no-deps -e "$REPO"
}
