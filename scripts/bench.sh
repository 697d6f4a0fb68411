#!/usr/bin/env bash
# `make bench`: the gateway's side-by-side benchmark (bench/gateway_bench.py) against the
# PostgreSQL and Redis named by DATABASE_URL/REDIS_URL, else the local ones, else throwaway
# servers (scripts/services.sh). It seeds its own `crosslogic_bench` database. Arguments go to
# the bench: make bench ARGS="--quick", or bash scripts/bench.sh --workers 2. With --autoscale first:
# bench/autoscale_bench.py instead (make bench-autoscale), its own crosslogic_autoscale_bench database.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
export DATABASE_URL REDIS_URL
status=0
if [[ "${1:-}" == "--autoscale" ]]; then
  shift
  .venv/bin/python bench/autoscale_bench.py "$@" || status=$?
  exit "$status"
fi
.venv/bin/python bench/gateway_bench.py ${ARGS:-} "$@" || status=$?
exit "$status"
