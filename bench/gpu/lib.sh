# Shared by bench/gpu/*.sh: arguments, provenance, a time plan with one timeout per step, step
# logs, a summary rewritten after every step, and the dry-run mode.
#
# A script sources this file, then:
#
#   gpu_init NAME BUDGET_S "$@"        # parses [--dry-run] [--sha SHA] OUTDIR
#   plan_slot SLOT SECONDS              # the time plan: serial slots, in order
#   plan_done                           # checks the plan against the budget; provenance
#   run_step SLOT -- CMD...             # CMD alone in SLOT
#   spawn_step SLOT MEMBER -- CMD...    # CMD in the background, sharing SLOT's time with others
#   join_slot SLOT                      # waits for SLOT's members
#   collect SRC... DEST_DIR             # copies result files into OUTDIR (not in a dry run)
#   gpu_finish                          # final summary; the exit status
#
# Timeouts. Each slot has a planned number of seconds, and the plan (with PROVENANCE_S for the
# provenance queries at the start and END_RESERVE_S for the summary at the end) must fit the
# budget, so the script ends in time even if every step runs to its timeout. At run time a slot
# gets what is left of the budget minus the planned seconds of the slots after it: time that
# earlier slots did not use goes to the next one, and a hang can never take time planned for
# later slots. `timeout` sends TERM to the step's process group,
# then KILL after KILL_GRACE seconds, which the slot's time includes. A step that fails or
# times out is recorded and the script goes on with the next.
#
# Dry run (--dry-run): nothing is executed. Every command line is collected and checked by
# bench/gpu/dryrun.py (entry points and their options, files named, what the check can run on a
# machine without a GPU), and the plan is checked against the budget; the exit status says
# whether all of it holds. OUTDIR then receives the plan and the check's report.
#
# The caller passes the git sha (--sha, or TOKEN_PRUNE_GIT_SHA): the copy on the GPU machine
# may have no .git. PYTHON picks the interpreter (default python).

GPU_LIB_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$GPU_LIB_DIR/../.." && pwd)"
PY="${PYTHON:-python}"
KILL_GRACE=5
PROVENANCE_S=15   # nvidia-smi (5 s at most) + the version queries (11 s at most)
END_RESERVE_S=5   # the last summary

gpu_usage() {
  echo "usage: bash bench/gpu/$GPU_NAME.sh [--dry-run] [--sha GIT_SHA] OUTDIR" >&2
  exit 2
}

gpu_init() {
  GPU_NAME="$1" BUDGET_S="$2"
  shift 2
  DRY_RUN=0
  OUT=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      --sha) [ $# -ge 2 ] || gpu_usage; export TOKEN_PRUNE_GIT_SHA="$2"; shift ;;
      -h|--help) gpu_usage ;;
      -*) echo "$GPU_NAME.sh: unknown option $1" >&2; gpu_usage ;;
      *) [ -z "$OUT" ] || gpu_usage; OUT="$1" ;;
    esac
    shift
  done
  [ -n "$OUT" ] || gpu_usage
  mkdir -p "$OUT/logs"
  OUT="$(cd "$OUT" && pwd)"
  if [ -z "${TOKEN_PRUNE_GIT_SHA:-}" ]; then
    TOKEN_PRUNE_GIT_SHA="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || echo unknown)"
    export TOKEN_PRUNE_GIT_SHA
  fi
  GPU_START=$(date +%s)
  GPU_DEADLINE=$((GPU_START + BUDGET_S))
  SLOTS=()
  declare -gA SLOT_S=() SLOT_TIMEOUT=() SLOT_PIDS=()
  FAILED_STEPS=()
  STEPS="$OUT/steps.tsv"
  printf 'slot\tmember\tplanned_s\ttimeout_s\tstart_s\tseconds\trc\tstatus\n' > "$STEPS"
  CMD_DIR="$OUT/dryrun/commands"
  if [ "$DRY_RUN" = 1 ]; then
    rm -rf "$CMD_DIR"
    mkdir -p "$CMD_DIR"
  fi
  # The package and its scripts come from this copy of the repository; nothing is installed.
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  export PYTHONUNBUFFERED=1
  cd "$REPO"
  log "$GPU_NAME.sh: budget ${BUDGET_S}s, output $OUT, git $TOKEN_PRUNE_GIT_SHA$([ "$DRY_RUN" = 1 ] && echo ', DRY RUN')"
}

log() { echo "[$GPU_NAME +$(( $(date +%s) - ${GPU_START:-$(date +%s)} ))s] $*"; }

plan_slot() {
  SLOTS+=("$1")
  SLOT_S[$1]="$2"
}

planned_after() {  # the planned seconds of the slots after $1
  local total=0 seen=0 s
  for s in "${SLOTS[@]}"; do
    [ "$seen" = 1 ] && total=$((total + SLOT_S[$s]))
    [ "$s" = "$1" ] && seen=1
  done
  echo "$total"
}

plan_done() {
  local total=$((PROVENANCE_S + END_RESERVE_S)) s
  for s in "${SLOTS[@]}"; do total=$((total + SLOT_S[$s])); done
  {
    printf 'slot\tplanned_s\n'
    printf 'provenance\t%s\n' "$PROVENANCE_S"
    for s in "${SLOTS[@]}"; do printf '%s\t%s\n' "$s" "${SLOT_S[$s]}"; done
    printf 'reserve\t%s\n' "$END_RESERVE_S"
    printf 'total\t%s\n' "$total"
    printf 'budget\t%s\n' "$BUDGET_S"
  } > "$OUT/plan.tsv"
  log "time plan: provenance ${PROVENANCE_S}s, $(for s in "${SLOTS[@]}"; do printf '%s %ss, ' "$s" "${SLOT_S[$s]}"; done)reserve ${END_RESERVE_S}s = ${total}s of ${BUDGET_S}s"
  if [ "$total" -gt "$BUDGET_S" ]; then
    echo "$GPU_NAME.sh: the time plan (${total}s) exceeds the budget (${BUDGET_S}s)" >&2
    PLAN_OK=0
    [ "$DRY_RUN" = 1 ] || exit 2
  else
    PLAN_OK=1
  fi
  provenance
  summarize
}

provenance() {
  local smi
  if smi="$(timeout -k 1 4 nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap \
            --format=csv,noheader 2>/dev/null)"; then
    echo "$smi" > "$OUT/nvidia-smi.csv"
  fi
  timeout -k 1 10 "$PY" "$GPU_LIB_DIR/report.py" provenance --out "$OUT" --script "$GPU_NAME" \
    --budget "$BUDGET_S" --dry-run "$DRY_RUN" > "$OUT/logs/provenance.log" 2>&1 \
    || log "provenance: incomplete, see logs/provenance.log"
}

# gpu_arch: the local GPU's compute capability for TORCH_CUDA_ARCH_LIST (9.0 when none is found,
# e.g. in a dry run: H100 and H200 are both sm_90).
gpu_arch() {
  local cap
  cap="$(head -n 1 "$OUT/nvidia-smi.csv" 2>/dev/null | awk -F', *' '{print $4}')"
  case "$cap" in
    [0-9]*.[0-9]*) echo "$cap" ;;
    *) echo 9.0 ;;
  esac
}

# sanitizer_bin: compute-sanitizer on PATH, else the CUDA toolkit's.
sanitizer_bin() {
  command -v compute-sanitizer 2>/dev/null || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
}

summarize() {
  timeout 30 "$PY" "$GPU_LIB_DIR/report.py" summary --out "$OUT" --script "$GPU_NAME" \
    > /dev/null 2>> "$OUT/logs/report.log" || log "summary: see logs/report.log"
}

slot_timeout() {  # what slot $1 may use now: the rest of the budget minus the later slots' plan
  echo $(( GPU_DEADLINE - $(date +%s) - END_RESERVE_S - $(planned_after "$1") ))
}

record() {  # slot member planned timeout start seconds rc status
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$STEPS"
}

status_of() {  # rc -> status
  case "$1" in
    0) echo ok ;;
    124|137) echo timeout ;;
    *) echo "failed" ;;
  esac
}

# start_member SLOT MEMBER CMD...: runs CMD (background) under the slot's timeout, or, in a dry
# run, hands it to the check.
start_member() {
  local slot="$1" member="$2"
  shift 2
  [ -n "${SLOT_S[$slot]:-}" ] || { echo "$GPU_NAME.sh: slot $slot is not in the plan" >&2; exit 2; }
  local logf="$OUT/logs/$member.log"
  if [ "$DRY_RUN" = 1 ]; then
    printf '%s\0' "$slot" "$member" "$@" > "$CMD_DIR/$(printf '%02d' "$(ls "$CMD_DIR" | wc -l)")-$member"
    return 0
  fi
  if [ -z "${SLOT_TIMEOUT[$slot]:-}" ]; then
    SLOT_TIMEOUT[$slot]=$(slot_timeout "$slot")
  fi
  local limit=${SLOT_TIMEOUT[$slot]}
  if [ "$limit" -le "$KILL_GRACE" ]; then
    log "$member: not started, no time left"
    record "$slot" "$member" "${SLOT_S[$slot]}" "$limit" "$(( $(date +%s) - GPU_START ))" 0 "" "no time"
    FAILED_STEPS+=("$member:no-time")
    return 0
  fi
  log "$member: start (timeout $((limit - KILL_GRACE))s + ${KILL_GRACE}s), log logs/$member.log"
  {
    echo "# $member: $*"
    echo "# timeout $((limit - KILL_GRACE))s, started $(date -u +%FT%TZ)"
  } > "$logf"
  local t0
  t0=$(date +%s)
  STEP_TIMEOUT=$((limit - KILL_GRACE)) timeout -k "$KILL_GRACE" "$((limit - KILL_GRACE))" "$@" >> "$logf" 2>&1 &
  SLOT_PIDS[$slot]="${SLOT_PIDS[$slot]:-} $!:$member:$t0"
}

finish_members() {
  local slot="$1" entry pid member t0 rc status
  for entry in ${SLOT_PIDS[$slot]:-}; do
    IFS=: read -r pid member t0 <<< "$entry"
    rc=0
    wait "$pid" || rc=$?
    status=$(status_of "$rc")
    [ "$status" = ok ] || FAILED_STEPS+=("$member:$status")
    record "$slot" "$member" "${SLOT_S[$slot]}" "$((SLOT_TIMEOUT[$slot] - KILL_GRACE))" "$((t0 - GPU_START))" \
      "$(( $(date +%s) - t0 ))" "$rc" "$status"
    log "$member: $status (rc $rc) after $(( $(date +%s) - t0 ))s"
  done
  SLOT_PIDS[$slot]=""
  summarize
}

run_step() {
  local slot="$1"
  [ "${2:-}" = "--" ] || { echo "$GPU_NAME.sh: usage: run_step SLOT -- CMD..." >&2; exit 2; }
  shift 2
  start_member "$slot" "$slot" "$@"
  [ "$DRY_RUN" = 1 ] || finish_members "$slot"
}

spawn_step() {
  local slot="$1" member="$2"
  [ "${3:-}" = "--" ] || { echo "$GPU_NAME.sh: usage: spawn_step SLOT MEMBER -- CMD..." >&2; exit 2; }
  shift 3
  start_member "$slot" "$member" "$@"
}

join_slot() {
  [ "$DRY_RUN" = 1 ] || finish_members "$1"
}

# build_step run|spawn SLOT [WRAPPER...]: builds the CUDA extension in place for the local arch
# only, the wrapper (e.g. `nice -n 19 env MAX_JOBS=4`) in front; TOKEN_PRUNE_GPU_SKIP_BUILD=1
# records the step as skipped and uses whatever extension is there (a warm machine, a CPU trial).
build_step() {
  local how="$1" slot="$2"
  shift 2
  local cmd=("$@" env TOKEN_PRUNE_BUILD=cuda TORCH_CUDA_ARCH_LIST="$(gpu_arch)" "$PY" setup.py build_ext --inplace)
  if [ "${TOKEN_PRUNE_GPU_SKIP_BUILD:-0}" = 1 ] && [ "$DRY_RUN" = 0 ]; then
    log "build: skipped (TOKEN_PRUNE_GPU_SKIP_BUILD=1)"
    record "$slot" build "${SLOT_S[$slot]}" 0 "$(( $(date +%s) - GPU_START ))" 0 "" skipped
    return 0
  fi
  if [ "$how" = run ]; then
    run_step "$slot" -- "${cmd[@]}"
  else
    spawn_step "$slot" build -- "${cmd[@]}"
  fi
}

collect() {  # SRC... DEST_DIR (under OUTDIR): result files a step left outside OUTDIR
  local dest="${!#}"
  [ "$DRY_RUN" = 1 ] && return 0
  mkdir -p "$dest"
  cp -r "${@:1:$#-1}" "$dest/" 2>> "$OUT/logs/collect.log" || log "collect: some files were missing (logs/collect.log)"
}

gpu_finish() {
  local rc=0
  if [ "$DRY_RUN" = 1 ]; then
    log "dry run: checking $(ls "$CMD_DIR" | wc -l) command lines"
    "$PY" "$GPU_LIB_DIR/dryrun.py" --repo "$REPO" --out "$OUT/dryrun" "$CMD_DIR" || rc=1
    [ "${PLAN_OK:-0}" = 1 ] || rc=1
    summarize
    log "dry run $([ "$rc" = 0 ] && echo passed || echo FAILED): $OUT/dryrun/report.md"
    return "$rc"
  fi
  summarize
  log "done in $(( $(date +%s) - GPU_START ))s; summary: $OUT/summary.md"
  if [ "${#FAILED_STEPS[@]}" -gt 0 ]; then
    log "steps that did not pass: ${FAILED_STEPS[*]}"
    rc=1
  fi
  return "$rc"
}
