#!/usr/bin/env bash
# Proves that token_prune's CUDA extension compiles, links and registers its
# CUDA kernels, on a machine without a GPU.
#
# A CPU torch cannot link a CUDA extension, so this installs a CUDA build of
# torch into a throwaway venv, builds the extension there with nvcc for the
# GPU test machines' archs (sm_80, sm_90), loads it from outside the source
# tree and checks the dispatcher has CPU and CUDA kernels for every op. It also
# prints ptxas' register / spill report for every kernel.
#
# Environment: CUDA_HOME (default /usr/local/cuda), TORCH_CUDA_ARCH_LIST
# (default "8.0;9.0"), TOKEN_PRUNE_CUDA_TORCH (default 2.14.1), PYTHON.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python}"
CUDA_TORCH_VERSION="${TOKEN_PRUNE_CUDA_TORCH:-2.14.1}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
export TOKEN_PRUNE_BUILD=cuda
export TOKEN_PRUNE_PTXAS_VERBOSE=1
export MAX_JOBS="${MAX_JOBS:-2}"
export PIP_DISABLE_PIP_VERSION_CHECK=1

START=$(date +%s)
log() { echo "[cuda-build-check +$(( $(date +%s) - START ))s] $*"; }
fail() { echo "[cuda-build-check] FAILED: $*" >&2; exit 1; }

WORK="$(mktemp -d "${TMPDIR:-/tmp}/token_prune_cuda_check.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

[ -x "$CUDA_HOME/bin/nvcc" ] || fail "no nvcc at $CUDA_HOME/bin/nvcc (set CUDA_HOME)"
log "nvcc: $("$CUDA_HOME/bin/nvcc" --version | tail -n 1)"

log "creating venv in $WORK/venv"
"$PYTHON" -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q --upgrade setuptools wheel ninja numpy

log "installing torch==$CUDA_TORCH_VERSION (CUDA build)"
"$VPY" -m pip install -q "torch==$CUDA_TORCH_VERSION"
TORCH_DESC="$("$VPY" -c 'import torch; print(torch.__version__, torch.version.cuda)')"
log "torch in venv: $TORCH_DESC"
case "$TORCH_DESC" in
  *" None") fail "torch==$CUDA_TORCH_VERSION from the index is a CPU build; need a CUDA one" ;;
esac

if "$VPY" -m pip install -q nvidia-cutlass; then
  log "nvidia-cutlass installed (CUTLASS/CuTe headers available)"
else
  log "nvidia-cutlass unavailable; building without CUTLASS headers"
fi

# Build from a copy of the tracked and unignored files: nothing in the work
# tree (an in-place CPU _C.so, build/) can leak into this build, and the build
# leaves nothing behind in the work tree.
mkdir -p "$WORK/src"
if git -C "$REPO" rev-parse --is-inside-work-tree > /dev/null 2>&1; then
  # --ignore-failed-read: files deleted from the work tree but still in the index.
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | tar --null -T - --ignore-failed-read -cf - 2> /dev/null) | tar -xf - -C "$WORK/src"
else
  (cd "$REPO" && tar --exclude=./build --exclude='*.so' --exclude='*.egg-info' -cf - .) \
    | tar -xf - -C "$WORK/src"
fi
[ -f "$WORK/src/setup.py" ] && [ -d "$WORK/src/csrc" ] || fail "could not copy the sources"

log "building the extension (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS)"
BUILD_START=$(date +%s)
if ! (cd "$WORK/src" && "$VPY" -m pip install -v --no-build-isolation --no-deps .) \
    > "$WORK/build.log" 2>&1; then
  tail -n 100 "$WORK/build.log" >&2
  fail "the CUDA build failed (last 100 lines of the log above)"
fi
log "build took $(( $(date +%s) - BUILD_START ))s"
grep -m1 "token_prune: building" "$WORK/build.log" \
  || fail "setup.py did not report which extension it built"
grep -q "token_prune: building the CUDA extension" "$WORK/build.log" \
  || fail "setup.py built something other than the CUDA extension"
if grep -E "warning" "$WORK/build.log" | grep -E "csrc/" > "$WORK/warnings.txt"; then
  log "compiler warnings in csrc/:"
  cat "$WORK/warnings.txt"
fi

echo "---- ptxas report (per kernel and arch) ----"
grep -E "ptxas info\s*: (Compiling entry function|Function properties for|Used [0-9]+ registers)|bytes stack frame" \
  "$WORK/build.log" | sed -e 's/^ *//' | c++filt || true
if grep -E "bytes spill (stores|loads)" "$WORK/build.log" | grep -vqE " 0 bytes spill stores, 0 bytes spill loads"; then
  log "WARNING: some kernel spills registers (see the report above)"
fi
echo "--------------------------------------------"

# Load the extension on its own first (outside the source tree): it needs
# only torch, so a failure here is the extension's, not the package's.
cd "$WORK"
log "loading token_prune._C from the venv"
"$VPY" - <<'EOF'
import glob, importlib.util, os, sys, sysconfig

import torch

pkg_dir = os.path.join(sysconfig.get_paths()["platlib"], "token_prune")
found = glob.glob(os.path.join(pkg_dir, "_C*.so"))
assert found, f"no _C extension installed under {pkg_dir}"
spec = importlib.util.spec_from_file_location("token_prune._C", found[0])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
assert ext.WITH_CUDA == 1, "the extension was built without CUDA kernels"
OPS = ("compact_tokens", "glimpse_attention_map", "vip_attention", "keep_mask",
       "scatter_rows", "scatter_rows_")
for op in (f"token_prune::{name}" for name in OPS):
    for key in ("CPU", "CUDA"):
        ok = torch._C._dispatch_has_kernel_for_dispatch_key(op, key)
        print(f"  {op}: {key} kernel registered: {ok}")
        assert ok, f"{op} has no {key} kernel"
print("  extension:", found[0])
EOF

log "installing runtime dependencies to import the whole package"
source "$REPO/scripts/common.sh"
"$VPY" -m pip install -q "$(transformers_requirement)" safetensors tqdm
"$VPY" - <<'EOF'
import torch
import token_prune._C
from token_prune import _ops

import sys
assert token_prune._C.__file__.startswith(sys.prefix), token_prune._C.__file__
assert _ops.EXTENSION_LOADED and _ops.EXTENSION_WITH_CUDA, _ops.EXTENSION_ERROR
assert not _ops._MISSING_OPS, _ops._MISSING_OPS
for name in _ops.SCHEMAS:
    assert str(getattr(torch.ops.token_prune, name).default._schema) == "token_prune::" + _ops.SCHEMAS[name], name
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"token_prune::{name}", key), (name, key)

# The CPU kernel of this very build still works (the CUDA one needs a GPU).
keep = torch.tensor([[True, False, True], [False, False, True]])
hidden = torch.arange(6.0).reshape(2, 3, 1)
out = _ops.compact_tokens(keep, hidden, [], torch.arange(3).expand(1, 2, 3), torch.ones(2, 3, dtype=torch.long))
assert out[0].flatten().tolist() == [0.0, 2.0, 0.0, 5.0], out[0]
print("  import token_prune: OK,", token_prune._C.__file__)
EOF

log "OK: the CUDA extension builds for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST and registers CPU and CUDA kernels"
