#!/usr/bin/env bash
# One prepared GPU session for qbd's paper tier: a single command, every step capped by `timeout`,
# a failed or timed-out step recorded and the next one run anyway.
#
#   OUT=/some/dir bash benchmarks/gpu_session.sh          # on the GPU machine (the device tool sets OUT)
#   DRY=1 OUT=/tmp/gpu-dry bash benchmarks/gpu_session.sh # the same steps on the CPU, tiny (or --dry-run)
#
# Steps, most valuable first (a step the budget no longer covers is recorded as skipped):
#   setup        qbd's pytest plugin registered (pip install -e . offline when it is not); wheels in .whl/ if any
#   stand_in     (in the background from the start, CPU only) stand-in CIFAR-10 and GTSRB in $WORK/data
#   environment  nvidia-smi -L, torch / CUDA / device name, the packages qbd needs (one JSON line)
#   gpu_test     pytest -m qbd_gpu tests/unit/test_devices.py (models placed where their scheme runs)
#   paper_tier   benchmarks/paper_tier.py --device cuda --compile --skip-sequential (training + NC timings)
#   paper_suite  pytest --pyargs qbd.suite --qbd-tier paper on the stand-in data, timed, with pass/fail counts
#
# Out ($OUT, at most 6 files, so all come back): figures.jsonl (one JSON line per step and per figure),
# session.log (every step's log but the suite's), paper_suite.log, paper-report/ (results.json,
# report.md, heatmap.png). Big files (data, model store) go to $WORK, beside $OUT, never under it.
#
# Knobs (environment): BUDGET_S (whole script, seconds; default 570 so one 600 s call holds it),
# WORK, PYTHON, KEEP_CACHE=1 (reuse $WORK/cache's trained models, e.g. a second call that resumes),
# PAPER_WORKERS (xdist workers for the suite; 0 = none), PAPER_TIER_ARGS, SUITE_ARGS (extra pytest
# arguments), SUITE_K (a -k filter), STAND_IN_SCALE, CAP_<STEP> (a step's own cap, seconds), STEPS (the
# steps to run, comma-separated; default all: setup,environment,gpu_test,paper_tier,paper_suite).
set -u

cd "$(dirname "$0")/.." || exit 2
[[ "${1:-}" == "--dry-run" ]] && DRY=1
DRY=${DRY:-0}
OUT=${OUT:-$PWD/out/gpu-session}
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(dirname "$OUT")/qbd-gpu-work}
mkdir -p "$WORK" 2>/dev/null || WORK=${TMPDIR:-/tmp}/qbd-gpu-work  # $OUT's parent may not be ours to write
PY=${PYTHON:-python3}
LOGS=$WORK/logs
DATA=$WORK/data
export QBD_CACHE_DIR=$WORK/cache
export PYTHONUNBUFFERED=1
CORES=$(nproc 2>/dev/null || echo 1)

if [[ "$DRY" == 1 ]]; then  # the CPU, tiny sizes, a few cells: proves the script, measures nothing
    BUDGET_S=${BUDGET_S:-1500}
    DEVICE=cpu
    STAND_IN_SCALE=${STAND_IN_SCALE:-0.002}
    PAPER_TIER_ARGS=${PAPER_TIER_ARGS:---device cpu --quick --model tiny-cnn --skip-sequential --skip-43}
    PAPER_WORKERS=${PAPER_WORKERS:-0}
    # two data sets' models (ResNet-18 on 100 / 53 images): the cells fail their Phase-1 gate at this size
    SUITE_K=${SUITE_K:-(cifar10/fp32/strip and canonical) or (test_attack and fp32)}
    : "${CAP_SETUP:=120}" "${CAP_ENV:=60}" "${CAP_GPU_TEST:=120}" "${CAP_PAPER_TIER:=300}" "${CAP_STAND_IN:=180}" "${CAP_SUITE:=900}"
else
    BUDGET_S=${BUDGET_S:-570}
    DEVICE=cuda
    STAND_IN_SCALE=${STAND_IN_SCALE:-1}
    PAPER_TIER_ARGS=${PAPER_TIER_ARGS:---device cuda --compile --skip-sequential}
    PAPER_WORKERS=${PAPER_WORKERS:-4}
    SUITE_K=${SUITE_K:-}
    # the suite's cap: whatever the budget has left
    : "${CAP_SETUP:=90}" "${CAP_ENV:=60}" "${CAP_GPU_TEST:=90}" "${CAP_PAPER_TIER:=240}" "${CAP_STAND_IN:=200}" "${CAP_SUITE:=100000}"
fi
STEPS=${STEPS:-setup,environment,gpu_test,paper_tier,paper_suite}
RESERVE_S=15      # kept back at the end for the summary
MIN_STEP_S=20     # a step the budget gives less than this is skipped
KILL_AFTER=20     # SIGINT first (pytest then writes its summary and report), SIGKILL this much later

rm -rf "$LOGS" "$DATA"
[[ "${KEEP_CACHE:-0}" == 1 ]] || rm -rf "$QBD_CACHE_DIR"
mkdir -p "$LOGS" "$DATA" "$QBD_CACHE_DIR" || exit 2
rm -f "$OUT/figures.jsonl" "$OUT/session.log" "$OUT/paper_suite.log"
rm -rf "$OUT/paper-report"

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
START=$(now)

cap_for() {  # the step's own cap, or what is left of the budget (less the reserve) if smaller
    local left
    left=$(awk -v a="$START" -v b="$(now)" -v budget="$BUDGET_S" -v r="$RESERVE_S" 'BEGIN { printf "%d", budget - r - (b - a) }')
    (( left < $1 )) && echo "$left" || echo "$1"
}

record() {  # step status rc seconds cap [extra JSON fields] [summary note]
    printf '{"figure":"step","step":"%s","status":"%s","rc":%s,"seconds":%s,"cap_s":%s%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:+,$6}" >> "$OUT/figures.jsonl"
    printf '[gpu-session] %-12s %-8s %7s s (cap %s s, rc %s)%s\n' "$1" "$2" "$4" "$5" "$3" "${7:+  $7}"
}

status_of() {  # rc -> ok / timeout / failed (timeout(1): 124 after SIGINT, 137 after the SIGKILL)
    case $1 in 0) echo ok ;; 124|137) echo timeout ;; *) echo failed ;; esac
}

keep_log() {  # a step's log into session.log, its JSON figure lines into figures.jsonl
    { echo "===== $1 ====="; cat "$2"; echo; } >> "$OUT/session.log"
    sed -n 's/^{"figure"/{"step":"'"$1"'","figure"/p' "$2" >> "$OUT/figures.jsonl"
}

selected() { [[ ",$STEPS," == *",$1,"* ]]; }

run_step() {  # name cap command... ; the command's output goes to $LOGS/name.log
    local name=$1 cap t0 rc
    if ! selected "$name"; then
        record "$name" skipped null 0 0 '"why":"not in STEPS"'; return 0
    fi
    cap=$(cap_for "$2"); shift 2
    if (( cap < MIN_STEP_S )); then
        record "$name" skipped null 0 "$cap" '"why":"budget spent"'; return 0
    fi
    t0=$(now)
    timeout -s INT -k "$KILL_AFTER" "$cap" "$@" > "$LOGS/$name.log" 2>&1
    rc=$?
    keep_log "$name" "$LOGS/$name.log"
    record "$name" "$(status_of $rc)" "$rc" "$(since "$t0")" "$cap" "" "$(tail -n 1 "$LOGS/$name.log" | cut -c1-100)"
}

# pytest's outcome counts from its log: the final summary line, else (killed before it) the -v lines.
PYTEST_COUNTS='
import json, re, sys
text = open(sys.argv[1], errors="replace").read()
words = "passed|failed|skipped|deselected|xfailed|xpassed|errors?|warnings?"
final = [ln for ln in text.splitlines() if re.search(rf"\d+ ({words})\b.* in [\d.]+s", ln)]
counts = {}
if final:
    for n, w in re.findall(rf"(\d+) ({words})\b", final[-1]):
        counts[{"error": "errors", "warning": "warnings"}.get(w, w)] = int(n)
else:
    for w in ("PASSED", "FAILED", "SKIPPED", "ERROR", "XFAIL", "XPASS"):
        counts[w.lower()] = len(re.findall(rf"\b{w}\b", text))
m = re.search(r"(?:collected|\[) ?(\d+) items?", text)
print(json.dumps({"counts": counts, "summary_line": bool(final), "collected": int(m.group(1)) if m else None,
                  "interrupted": "KeyboardInterrupt" in text or "Interrupted" in text})[1:-1])
'
pytest_counts() { "$PY" -c "$PYTEST_COUNTS" "$1" 2>/dev/null || echo '"counts":null'; }

# --- stand_in: CPU work, started first so it overlaps the GPU steps ------------------------------
STAND_IN_T0=$(now)
STAND_IN_PIDS=()
selected paper_suite && for ds in cifar10 gtsrb; do
    (
        timeout -s INT -k "$KILL_AFTER" "$CAP_STAND_IN" "$PY" benchmarks/stand_in_data.py --root "$DATA" \
            --scale "$STAND_IN_SCALE" --dataset "$ds" > "$LOGS/stand_in_$ds.log" 2>&1
        rc=$?
        now > "$LOGS/stand_in_$ds.end"  # when it finished, for the step's seconds
        exit $rc
    ) &
    STAND_IN_PIDS+=("$!")
done

# --- setup: qbd's pytest plugin must be registered (the GPU image has no qbd installed) -----------
HAS_PLUGIN='
import sys
from importlib.metadata import entry_points
sys.exit(0 if any(e.value == "qbd.pytest_plugin" for e in entry_points(group="pytest11")) else 1)
'
SETUP='
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing the carried wheels: $(ls .whl)"
    "$0" -m pip install -q --no-index --no-deps --no-cache-dir .whl/*.whl || echo "wheels: install failed"
fi
if "$0" -c "$1"; then
    echo "qbd pytest plugin: already registered"
else
    echo "qbd pytest plugin: not registered; pip install -e . (offline, no deps)"
    "$0" -m pip install -q --no-index --no-deps --no-build-isolation -e . && "$0" -c "$1"
fi
'
run_step setup "$CAP_SETUP" bash -c "$SETUP" "$PY" "$HAS_PLUGIN"
PLUGIN_ARGS=()
if ! "$PY" -c "$HAS_PLUGIN" 2>/dev/null; then  # load the plugin from the source tree instead
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
    PLUGIN_ARGS=(-p qbd.pytest_plugin)
    echo "[gpu-session] qbd plugin loaded from the source tree (-p qbd.pytest_plugin)"
fi

# --- environment ---------------------------------------------------------------------------------
ENV_PY='
import json, os, platform, subprocess
info = {"figure": "environment", "python": platform.python_version(), "cpu_count": os.cpu_count()}
try:  # which commit the copied tree is (null where it travelled without .git)
    git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    info["git_head"] = git.stdout.strip() or None
except (OSError, subprocess.SubprocessError):
    info["git_head"] = None
try:
    info["nvidia_smi"] = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError) as e:
    info["nvidia_smi"] = None
    info["nvidia_smi_error"] = type(e).__name__
try:
    import torch
    info.update(torch=torch.__version__, cuda_runtime=torch.version.cuda, cuda_available=torch.cuda.is_available(),
                device_count=torch.cuda.device_count() if torch.cuda.is_available() else 0)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, device_memory_gib=round(p.total_memory / 2**30, 1))
except Exception as e:  # recorded, and the session goes on
    info["torch_error"] = f"{type(e).__name__}: {e}"
for mod in ("torchvision", "torchao", "platformdirs", "sklearn", "scipy", "safetensors", "filelock",
            "threadpoolctl", "PIL", "xdist", "qbd"):
    try:
        info[mod] = getattr(__import__(mod), "__version__", "present")
    except Exception:
        info[mod] = None
print(json.dumps(info))
'
run_step environment "$CAP_ENV" "$PY" -c "$ENV_PY"

# --- gpu_test: the placement test on a real GPU (skips on the CPU) --------------------------------
run_step gpu_test "$CAP_GPU_TEST" "$PY" -m pytest -q -p no:xdist -p no:randomly -m qbd_gpu "${PLUGIN_ARGS[@]}" \
    tests/unit/test_devices.py
selected gpu_test && printf '{"step":"gpu_test","figure":"pytest_counts",%s}\n' "$(pytest_counts "$LOGS/gpu_test.log")" \
    >> "$OUT/figures.jsonl"

# --- paper_tier: ResNet-18 training and Neural Cleanse timings -----------------------------------
# shellcheck disable=SC2086  # PAPER_TIER_ARGS is a list of words
run_step paper_tier "$CAP_PAPER_TIER" "$PY" benchmarks/paper_tier.py $PAPER_TIER_ARGS

# --- stand_in: wait for the background writers ---------------------------------------------------
STAND_IN_RC=0
if selected paper_suite; then
    for pid in "${STAND_IN_PIDS[@]}"; do
        wait "$pid"; rc=$?
        (( rc != 0 )) && STAND_IN_RC=$rc
    done
    for ds in cifar10 gtsrb; do keep_log "stand_in_$ds" "$LOGS/stand_in_$ds.log"; done
    secs=$(cat "$LOGS"/stand_in_*.end | awk -v a="$STAND_IN_T0" '$1 - a > m { m = $1 - a } END { printf "%.1f", m }')
    record stand_in "$(status_of $STAND_IN_RC)" "$STAND_IN_RC" "$secs" "$CAP_STAND_IN" \
        "\"scale\":$STAND_IN_SCALE,\"data_mib\":$(du -sm "$DATA" | cut -f1)" "(background; scale $STAND_IN_SCALE)"
fi

# --- paper_suite: the whole paper tier through pytest, timed -------------------------------------
SUITE=("$PY" -m pytest --pyargs qbd.suite --qbd-tier paper --qbd-data-root="$DATA" --qbd-report="$OUT/paper-report"
       --qbd-device "$DEVICE" -p no:randomly -v -rfE --durations=20 "${PLUGIN_ARGS[@]}")
# --dist loadgroup spelled out: xdist's own pytest_cmdline_main turns -n's default into "load" before
# qbd's plugin can make it loadgroup (one worker per model and scheme)
(( PAPER_WORKERS > 0 )) && SUITE+=(-n "$PAPER_WORKERS" --dist loadgroup)
[[ -n "$SUITE_K" ]] && SUITE+=(-k "$SUITE_K")
# shellcheck disable=SC2206  # SUITE_ARGS is a list of words
SUITE+=(${SUITE_ARGS:-})
# one share of the cores per xdist worker (int8 cells run on the CPU), unless the caller set it
THREADS=${OMP_NUM_THREADS:-$(( CORES / (PAPER_WORKERS > 0 ? PAPER_WORKERS : 1) ))}
CACHE_FILES=$(find "$QBD_CACHE_DIR" -type f | wc -l)
cap=$(cap_for "$CAP_SUITE")
if ! selected paper_suite; then
    record paper_suite skipped null 0 0 '"why":"not in STEPS"'
elif (( STAND_IN_RC != 0 )); then
    record paper_suite skipped null 0 "$cap" '"why":"no stand-in data"'
elif (( cap < MIN_STEP_S )); then
    record paper_suite skipped null 0 "$cap" '"why":"budget spent"'
else
    echo "[gpu-session] paper_suite: ${SUITE[*]}  (cap $cap s, OMP_NUM_THREADS=$THREADS)"
    t0=$(now)
    OMP_NUM_THREADS=$THREADS timeout -s INT -k "$KILL_AFTER" "$cap" "${SUITE[@]}" > "$OUT/paper_suite.log" 2>&1
    rc=$?
    secs=$(since "$t0")
    counts=$(pytest_counts "$OUT/paper_suite.log")
    [[ -f "$OUT/paper-report/results.json" ]] && report=true || report=false
    record paper_suite "$(status_of $rc)" "$rc" "$secs" "$cap" \
        "\"workers\":$PAPER_WORKERS,\"omp_threads\":$THREADS,\"cache_files_at_start\":$CACHE_FILES,\"dry\":$DRY,\"report\":$report,$counts" \
        "$(grep -E '[0-9]+ (passed|failed|error)' "$OUT/paper_suite.log" | tail -n 1 | cut -c1-100)"
fi

echo "[gpu-session] done in $(since "$START") s (budget $BUDGET_S s); figures: $OUT/figures.jsonl"
ls -la "$OUT" "$OUT/paper-report" 2>/dev/null | sed 's/^/[gpu-session]   /'
exit 0
