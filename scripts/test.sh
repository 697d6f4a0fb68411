#!/usr/bin/env bash
# Runs the suite against a real PostgreSQL and Redis: those named by DATABASE_URL/REDIS_URL,
# else the local ones on their standard ports, else throwaway servers started from installed
# binaries. Stops with a message naming what to install when none can be had.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/services.sh
ensure_postgres
ensure_redis
echo "test: PostgreSQL at ${DATABASE_URL%%\?*}, Redis at $REDIS_URL"
exec .venv/bin/pytest "$@"
