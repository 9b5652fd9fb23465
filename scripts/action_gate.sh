#!/usr/bin/env bash
# The gate the composite action (action.yml) runs in a defense author's repository: qbd's matrix
# for their defense, the report written (report.md, heatmap.png, results.json; report.md also into
# the job's step summary when $GITHUB_STEP_SUMMARY is set), and qbd run's exit status: 1 when any
# cell, deployed model or row fails its expectation, 2 on a usage error. Inputs come as environment
# variables, so the script runs the same outside Actions (tests/packaging/test_action.py runs it):
#   QBD_DEFENSE      defenses, comma-separated: installed names or module:Class (required)
#   QBD_DATASETS     default: digits,synthetic
#   QBD_SCHEMES      default: the tier's four (fp32, int4-sim, int8-dynamic, int8-static)
#   QBD_PROTOCOLS    default: canonical (the paper protocol feeds only a clean holdout)
#   QBD_EXPECTATIONS your own expectations table (default: the table qbd ships)
#   QBD_REPORT_DIR   default: qbd-report
#   QBD_EXTRA_ARGS   anything else for `qbd run`, word-split (e.g. "--seeds 3 --defense-timeout 600")
#   QBD_PYTHON       the interpreter qbd is installed in (default: python)
set -uo pipefail

if [ -z "${QBD_DEFENSE:-}" ]; then
  echo "qbd action: the 'defense' input is required (your defense's entry-point name or module:Class)" >&2
  exit 2
fi
report=${QBD_REPORT_DIR:-qbd-report}
args=(run --tier smoke --defense "$QBD_DEFENSE" --dataset "${QBD_DATASETS:-digits,synthetic}"
      --protocol "${QBD_PROTOCOLS:-canonical}" --report "$report" --no-progress)
[ -n "${QBD_SCHEMES:-}" ] && args+=(--quant "$QBD_SCHEMES")
[ -n "${QBD_EXPECTATIONS:-}" ] && args+=(--expectations "$QBD_EXPECTATIONS")
# shellcheck disable=SC2206  # word splitting is the point
[ -n "${QBD_EXTRA_ARGS:-}" ] && args+=(${QBD_EXTRA_ARGS})

echo "qbd action: qbd ${args[*]}" >&2
log=$(mktemp)
# stdout as it is; stderr (the cells as they finish, the FAIL lines) to the job log and, for the
# summary's one line of why, to $log
{ "${QBD_PYTHON:-python}" -m qbd "${args[@]}" 2>&1 1>&3 3>&- | tee "$log" >&2; } 3>&1
rc=${PIPESTATUS[0]}
if [ -n "${GITHUB_STEP_SUMMARY:-}" ] && [ "$rc" -ne 0 ]; then
  case $rc in
    1) if grep -q "^qbd: FAIL" "$log" 2>/dev/null; then
         why="a cell, a deployed model or a row fails its expectation: the list is above, and in report.md"
       else
         why="qbd stopped: $(tail -n 1 "$log" 2>/dev/null)"
       fi ;;
    2) why="a usage error: $(grep -m 1 "^qbd: error" "$log" 2>/dev/null || tail -n 1 "$log" 2>/dev/null)" ;;
    *) why="qbd did not finish: $(tail -n 1 "$log" 2>/dev/null)" ;;
  esac
  printf '\n**qbd: exit %s** (%s).\n' "$rc" "$why" >> "$GITHUB_STEP_SUMMARY"
fi
rm -f "$log"
exit $rc
