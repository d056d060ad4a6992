#!/usr/bin/env bash
# lctx in any CI system: the steps of examples/ci/lctx.yml (GitHub Actions) as one script.
#
#   sweep an experiment -> pack its results (with the baseline's history) -> report: dashboard with history,
#   gate against the baseline, Markdown summary for the job page -> exit status of the gate.
#
# Settings (environment variables):
#   EXPERIMENT  the experiment file to sweep (default: examples/ci/experiment.toml)
#   WORK        where the results, the pack and the report go (default: lctx-ci)
#   BASELINE    the previous run's pack (lctx pack), a results directory or an https:// URL of either; empty: no
#               gate (the first run)
#   TOLERANCE   the gate's floor (default: 2%); each cell's own 95% noise widens it (lctx report --no-noise: off)
#   SUMMARY     the Markdown summary (default: $GITHUB_STEP_SUMMARY when set, else $WORK/summary.md)
#   INSTALL     pip arguments to install lctx first, e.g. "-e ." or a git URL; empty: lctx is installed already
#   LCTX        the lctx command (default: lctx; e.g. "python -m lctx")
# Afterwards publish $WORK/report/ (the dashboard: static, no network requests) and keep $WORK/results.tar.gz
# as the next run's BASELINE. Exit status: 0 gate passed (or no baseline), 1 regressions, 2 bad input.
set -euo pipefail
EXPERIMENT=${EXPERIMENT:-examples/ci/experiment.toml}
WORK=${WORK:-lctx-ci}
BASELINE=${BASELINE:-}
TOLERANCE=${TOLERANCE:-2%}
SUMMARY=${SUMMARY:-${GITHUB_STEP_SUMMARY:-$WORK/summary.md}}
read -r -a lctx <<< "${LCTX:-lctx}"

# 1. install
if [ -n "${INSTALL:-}" ]; then
  read -r -a install <<< "$INSTALL"
  python -m pip install "${install[@]}"
fi
mkdir -p "$WORK"

# 2. run the experiment (resumable: a rerun computes only the cells not yet recorded)
"${lctx[@]}" sweep "$EXPERIMENT" --out "$WORK/results" --report "$WORK/report"

# 3. pack the results, carrying the baseline's runs along: the artifact the next run downloads as its baseline
baseline=() history=()
if [ -n "$BASELINE" ]; then
  baseline=(--baseline "$BASELINE")
  history=(--history "$BASELINE")
fi
"${lctx[@]}" pack "$WORK/results" -o "$WORK/results.tar.gz" "${history[@]}"

# 4. report: the dashboard (with the history of runs), the gate, the summary; its exit status is the verdict
status=0
"${lctx[@]}" report "$WORK/results" --out "$WORK/report" "${baseline[@]}" "${history[@]}" \
  --tolerance "$TOLERANCE" --summary-md "$SUMMARY" || status=$?

# 5. publish: upload $WORK/report (the dashboard) and $WORK/results.tar.gz (the next baseline)
echo "dashboard: $WORK/report/index.html · next baseline: $WORK/results.tar.gz · gate exit status: $status"
exit "$status"
