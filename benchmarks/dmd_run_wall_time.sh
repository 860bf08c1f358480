#!/usr/bin/env bash
# Wall time of `dmd run` on the embedded default: a run over what the store holds, a fully cached
# rerun, and an evaluate-only change. Run after `make demo` (or a first `dmd run`) from the repo root.
set -euo pipefail
export PREFECT_SERVER_ANALYTICS_ENABLED=false
dmd=".venv/bin/dmd"
t() { local s=$(date +%s.%N); "$@" >/dev/null 2>&1; echo "$(echo "$(date +%s.%N) - $s" | bc) s: $*"; }
t $dmd run
t $dmd run
t $dmd run --set evaluate.num_samples=3000
