#!/usr/bin/env bash
# `make bench`: the gateway's side-by-side benchmark (bench/gateway_bench.py) against the
# PostgreSQL and Redis named by DATABASE_URL/REDIS_URL, else the local ones, else throwaway
# servers (scripts/services.sh). It seeds its own `crosslogic_bench` database. Arguments go to
# the bench: make bench ARGS="--quick", or bash scripts/bench.sh --workers 2.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
export DATABASE_URL REDIS_URL
status=0
.venv/bin/python bench/gateway_bench.py ${ARGS:-} "$@" || status=$?
exit "$status"
