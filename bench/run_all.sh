#!/usr/bin/env bash
# The measurements behind bench/RESULTS.md: per-turn comparisons first (the "Must show"), then
# the per-op suite, then the report. Usage: bash bench/run_all.sh [extra pytest args, e.g. --quick]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".:python${PYTHONPATH:+:$PYTHONPATH}"
OUT=${ULTRAEDIT_BENCH_OUT:-bench/out}
mkdir -p "$OUT" bench/results
python -m pytest bench/bench_turn.py -s -p no:cacheprovider --benchmark-json="$OUT/turn.json" "$@"
python -m pytest bench/bench_ops.py -p no:cacheprovider --benchmark-json="$OUT/ops.json" "$@"
python bench/report.py "$OUT/turn.json" "$OUT/ops.json" --out-dir bench/results \
    --markdown bench/RESULTS.md --append bench/results_notes.md \
    --command "bash bench/run_all.sh $*   # = pytest bench/bench_turn.py + bench/bench_ops.py, then bench/report.py"
cp "$OUT/turn.json" "$OUT/ops.json" bench/results/
