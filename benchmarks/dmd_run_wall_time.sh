#!/usr/bin/env bash
# Wall time of `dmd run` on the embedded default, each on a temporary Prefect server as a user gets it:
# Prefect's own start-up (an empty flow), a first run on a fresh store, a fully cached rerun, and an
# evaluate-only change. Target: the cached rerun costs at most Prefect's start-up + 10 s.
# Usage (repo root, after `make install`): bash benchmarks/dmd_run_wall_time.sh [store dir]
set -euo pipefail
export PREFECT_SERVER_ANALYTICS_ENABLED=false
store="${1:-$(mktemp -d)/store}"
py=".venv/bin/python"
dmd=".venv/bin/dmd"
t() {
  local s e
  s=$(date +%s%N)
  "$@" >/dev/null 2>&1
  e=$(date +%s%N)
  printf '%8.1f s  %s\n' "$(( (e - s) / 1000000 ))e-3" "$*"
}
t $py -c "from prefect import flow; flow(name='empty')(lambda: None)()"
t $dmd run --set store="$store"
t $dmd run --set store="$store"
t $dmd run --set store="$store" --set evaluate.num_samples=3000
