#!/usr/bin/env bash
# Check a GPU machine in one command (docs/distributed.md, "Checking a GPU machine: tests/gpu/run.sh"):
#   bash tests/gpu/run.sh             # on the GPU machine: at most GPU_SCRIPT_BUDGET_S (540 s) in all
#   bash tests/gpu/run.sh --dry-run   # a CPU form of every step, well under a minute (GPU_SCRIPT_DRY_RUN=1 too)
# Steps, each under its own `timeout`, none stopping the others: the GPU tests (tests/gpu, the NCCL test
# of tests/test_engine.py); the engine's sync and async jobs over NCCL on 2 and 3 ranks (as many GPUs as
# ranks); sync against simultaneous on CUDA; the speed guard (decoupled bench --guard).
# Writes $OUT/gpu-summary.md (./gpu-summary.md without $OUT), rewritten after every step, and each
# step's log under $OUT/gpu-logs/. Exits 1 if any step failed, 0 otherwise (skips included).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
REPO=$PWD
DRY=${GPU_SCRIPT_DRY_RUN:-0}
for arg in "$@"; do
  case $arg in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument $arg (expected --dry-run)" >&2; exit 2 ;;
  esac
done
[ "$DRY" = 0 ] || DRY=1
PY=${PYTHON:-python}
DEST=${OUT:-$REPO}
SUMMARY=$DEST/gpu-summary.md
LOGS=$DEST/gpu-logs
HELPER=$REPO/tests/gpu/script_summary.py
BUDGET=${GPU_SCRIPT_BUDGET_S:-540}   # the whole script; each step's limit is cut to what is left
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX") || exit 2
STEPS=$WORK/steps.jsonl
SECTIONS=$WORK/sections
mkdir -p "$LOGS" "$SECTIONS" "$WORK/det"
rm -f "$LOGS"/*.log "$LOGS"/*.json
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} PYTHONUNBUFFERED=1
CONFIG=launch/configs/quickstart.toml
if [ "$DRY" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""   # the CPU form, on any machine
  DEVICE=cpu BACKEND=gloo EPOCHS=1
else
  DEVICE=cuda BACKEND=nccl EPOCHS=2
fi
DEADLINE=$((SECONDS + BUDGET))

# Deterministic kernels for every training job (the comparison of sync and simultaneous reuses them):
# cuBLAS's fixed workspace, and torch.use_deterministic_algorithms in every process (torchrun's
# workers included), through a sitecustomize that acts only under GPU_SCRIPT_DETERMINISTIC=1.
# warn_only: an op without a deterministic kernel warns (the log says which) instead of failing.
cat >"$WORK/det/sitecustomize.py" <<'EOF'
import os
if os.environ.get("GPU_SCRIPT_DETERMINISTIC") == "1":
    try:
        import torch
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    except Exception as e:  # noqa: BLE001 - never stop a job over it
        print(f"gpu-check sitecustomize: {e}")
EOF
DET=(env "PYTHONPATH=$WORK/det:$PYTHONPATH" GPU_SCRIPT_DETERMINISTIC=1 CUBLAS_WORKSPACE_CONFIG=:4096:8)

# ------------------------------------------------------------------ the page's header; prints the GPU count
NGPU=$("$PY" - "$WORK/header.md" "$DRY" "$BUDGET" <<'EOF'
import platform, subprocess, sys, time
out, dry, budget = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
def git(*a):
    try:
        return subprocess.run(["git", *a], capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:
        return "?"
try:
    import torch
    tv, cv = torch.__version__, torch.version.cuda
    ngpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = [torch.cuda.get_device_name(i) for i in range(ngpu)]
except Exception as e:
    tv, cv, ngpu, names = f"not importable ({e})", None, 0, []
lines = ["# GPU check (tests/gpu/run.sh)" + (": DRY RUN" if dry else ""), ""]
if dry:
    lines += ["**DRY RUN**: every step in its CPU form (collect-only tests, one rank on CPU over gloo, "
              "1 epoch, `decoupled bench --help` for the guard). Nothing here was measured on a GPU.", ""]
dirty = " (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
lines += [f"- when: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; commit {git('rev-parse', '--short', 'HEAD')}{dirty}",
          f"- machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"torch {tv}, CUDA {cv or '-'}",
          f"- GPUs visible: {ngpu}" + (": " + ", ".join(f"{i}: {n}" for i, n in enumerate(names)) if names else ""),
          f"- time budget of the script: {budget} s (GPU_SCRIPT_BUDGET_S); each step's limit is cut to what is left", ""]
open(out, "w").write("\n".join(lines))
print(ngpu)
EOF
) || NGPU=0

render() {
  "$PY" "$HELPER" render "$STEPS" --out "$SUMMARY" --header "$WORK/header.md" --sections "$SECTIONS" "$@"
}

BOOKS=0  # set when the bookkeeping itself failed: the script then fails too
record() {  # record ID STATUS WHAT NOTE: a step that did not run
  "$PY" "$HELPER" add "$STEPS" --id "$1" --status "$2" --what "$3" --note "$4" || BOOKS=1
  render --running >/dev/null
}

step() {  # step ID LIMIT_S WHAT [--pytest] -- COMMAND...: run it under its own timeout, log it, record it
  local id=$1 limit=$2 what=$3 kind=() log=$LOGS/$1.log
  shift 3
  [ "$1" = --pytest ] && { kind=(--pytest); shift; }
  [ "$1" = -- ] && shift
  local cmd left=$((DEADLINE - SECONDS))
  cmd=$(printf '%q ' "$@")
  if ((left < 15)); then
    record "$id" fail "$what" "not run: the script's time budget (GPU_SCRIPT_BUDGET_S=$BUDGET s) was spent"
    return
  fi
  ((limit > left)) && limit=$left
  echo "== $id: $what (limit ${limit}s)"
  printf '+ %s\n' "$cmd" >"$log"
  local t0 t1 rc
  t0=$(date +%s%N)
  timeout -k 45 "$limit" "$@" >>"$log" 2>&1  # -k: torchrun's agent takes up to 30 s to stop its workers
  rc=$?
  t1=$(date +%s%N)
  local ms=$(((t1 - t0) / 1000000))
  "$PY" "$HELPER" add "$STEPS" --id "$id" --what "$what" --rc "$rc" --limit "$limit" --log "$log" --cmd "$cmd" \
    --seconds "$((ms / 1000)).$(printf '%03d' $((ms % 1000)))" "${kind[@]}" || BOOKS=1
  render --running >/dev/null
}

job() {  # job RANKS MODE: train.mode=MODE on RANKS ranks over $BACKEND, then check its run directory
  local n=$1 mode=$2 dir=$WORK/$2-$1rank
  step "$mode-${n}rank" 120 "decoupled train --nproc-per-node $n, train.mode=$mode, $BACKEND on $DEVICE" -- \
    "$PY" "$HELPER" run-job --dir "$dir" --world "$n" --backend "$BACKEND" --device "$DEVICE" -- \
    "${DET[@]}" "$PY" -m decoupled train --nproc-per-node "$n" --config "$CONFIG" --out "$dir" \
    --set "train.mode=$mode" --set "train.device=$DEVICE" --set "dist.backend=$BACKEND" --set "train.epochs=$EPOCHS"
}

# ------------------------------------------------------------------ a. the GPU tests
if [ "$DRY" = 1 ]; then
  step gpu-tests 120 "tests/gpu (collect only: skipped without CUDA)" --pytest -- \
    "$PY" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/gpu
  step engine-gpu-test 120 "the NCCL test of tests/test_engine.py (collect only)" --pytest -- \
    "$PY" -m pytest --collect-only -q -p no:cacheprovider -m gpu tests/test_engine.py
else
  step gpu-tests 240 "tests/gpu: every single-process mode on CUDA, AMP, stream hand-over, no host sync" --pytest -- \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/gpu
  step engine-gpu-test 120 "the NCCL test of tests/test_engine.py (sync over NCCL against simultaneous)" --pytest -- \
    "$PY" -m pytest -q -p no:cacheprovider -m gpu -rs tests/test_engine.py
fi

# ------------------------------------------------------------------ b. the engine's jobs over NCCL
WHY_TWO="NCCL refuses two ranks on one GPU (\"Duplicate GPU detected\", NVIDIA/nccl#418), and two ranks over gloo with CUDA tensors would stage every message through the host, which is not the NCCL path"
UNTESTED=()
if ((NGPU >= 2)); then
  job 2 sync
  job 2 async
  SYNC_RUN=sync-2rank
else
  # a world of one still runs the engine across ranks (torchrun, the process group, the pipeline and its
  # feed), only without a link: on a GPU the NCCL start-up on the device, in the dry run gloo on CPU
  job 1 sync
  job 1 async
  SYNC_RUN=sync-1rank
  for mode in sync async; do
    record "$mode-2rank" skip "decoupled train --nproc-per-node 2, train.mode=$mode over NCCL" \
      "not run: $NGPU GPU(s) visible, 2 needed"
  done
  UNTESTED+=("- **2 ranks over NCCL** (sync, async, the links, the receiver thread's side stream and the hand-over of received batches, sync equal to simultaneous across ranks): $NGPU GPU(s) visible, 2 needed. $WHY_TWO.")
fi
if ((NGPU >= 3)); then
  job 3 sync
  job 3 async
else
  for mode in sync async; do
    record "$mode-3rank" skip "decoupled train --nproc-per-node 3, train.mode=$mode over NCCL" \
      "not run: $NGPU GPU(s) visible, 3 needed"
  done
  UNTESTED+=("- **3 ranks over NCCL** (a rank that both receives and sends): $NGPU GPU(s) visible, 3 needed (one GPU per rank; see above).")
fi

# ------------------------------------------------------------------ c. sync == simultaneous
step simultaneous 120 "decoupled train, train.mode=simultaneous on $DEVICE, one process (the reference)" -- \
  "$PY" "$HELPER" run-job --dir "$WORK/simultaneous" --world 1 --device "$DEVICE" -- \
  "${DET[@]}" "$PY" -m decoupled train --config "$CONFIG" --out "$WORK/simultaneous" \
  --set train.mode=simultaneous --set "train.device=$DEVICE" --set "train.epochs=$EPOCHS"
if ((NGPU >= 2)); then
  CONTEXT="sync ran on 2 ranks, one GPU each, over NCCL: the blocks' activations crossed GPUs through the engine's links."
elif [ "$DRY" = 1 ]; then
  CONTEXT="Dry run: sync on one rank over gloo on CPU against simultaneous on CPU, where they are equal bit for bit by design (tests/test_engine.py); this keeps the comparison's commands and parsing alive, nothing more."
else
  CONTEXT="One GPU: sync on a world of one (torchrun, NCCL on one rank): the engine's pipeline, feed and stage loop on CUDA in one process with every block, but no link, so no activation crossed ranks. It shows that the engine's loop computes what simultaneous computes on the same GPU; it says nothing of the transport."
fi
step compare 120 "sync ($SYNC_RUN) against simultaneous: test accuracies, final losses, weights" -- \
  "$PY" "$HELPER" compare --ref "$WORK/simultaneous" --got "$WORK/$SYNC_RUN" --ref-log "$LOGS/simultaneous.log" \
  --got-log "$LOGS/$SYNC_RUN.log" --md "$SECTIONS/10-compare.md" \
  --title "sync against simultaneous on $DEVICE (deterministic algorithms, CUBLAS_WORKSPACE_CONFIG=:4096:8)" \
  --context "$CONTEXT"

# ------------------------------------------------------------------ d. the speed guard
if [ "$DRY" = 1 ]; then
  step guard 60 "decoupled bench --help (the guard has no quick mode: about 90 s on 2 cores)" -- \
    bash -c 'out=$("$0" -m decoupled bench --help) && printf "%s\n" "$out" && grep -q -- --guard <<<"$out" && echo "NOTE: decoupled bench --help offers --guard (the guard itself has no quick mode)"' "$PY"
  printf '### Speed guard\n\nDry run: not measured (`decoupled bench --guard` has no quick mode; `decoupled bench --help` ran).\n' \
    >"$SECTIONS/20-guard.md"
else
  GUARD_ENV=()
  GUARD_WHERE="its straggler and receive-cost jobs on 2 GPUs over NCCL where the bench's device is auto (the thresholds were measured on a 2-core CPU machine)"
  if ((NGPU < 2)); then  # two NCCL ranks on one GPU fail: the guard's 2-rank rows run on the CPU it was calibrated on
    GUARD_ENV=(env CUDA_VISIBLE_DEVICES=)
    GUARD_WHERE="on CPU only (CUDA_VISIBLE_DEVICES empty): its 2-rank jobs would put two NCCL ranks on one GPU"
  fi
  step guard 240 "decoupled bench --guard, $GUARD_WHERE" -- \
    "${GUARD_ENV[@]}" "$PY" -m decoupled bench --guard --out "$WORK/guard"
  {
    printf '### Speed guard (`decoupled bench --guard`)\n\nRun %s.\n\n' "$GUARD_WHERE"
    if [ -f "$WORK/guard/guard.md" ]; then cat "$WORK/guard/guard.md"; else echo "No table: the guard did not finish (its log: $LOGS/guard.log)."; fi
  } >"$SECTIONS/20-guard.md"
  [ -f "$WORK/guard/guard.json" ] && cp "$WORK/guard/guard.json" "$LOGS/guard.json"
fi

# ------------------------------------------------------------------ what this machine could not test
if ((${#UNTESTED[@]})); then
  printf '### Not tested on this machine\n\n%s\n' "$(printf '%s\n' "${UNTESTED[@]}")" >"$SECTIONS/00-untested.md"
fi
render
rc=$?
((BOOKS)) && { echo "run.sh: recording a step failed (see above)" >&2; rc=1; }
for f in "$WORK"/simultaneous/summary.json "$WORK/$SYNC_RUN/summary.json"; do
  [ -f "$f" ] && cp "$f" "$LOGS/$(basename "$(dirname "$f")")-summary.json"
done
rm -rf "$WORK"
echo "summary: $SUMMARY ($( ((rc)) && echo 'a step failed' || echo 'no step failed'))"
exit "$rc"
