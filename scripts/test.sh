#!/usr/bin/env bash
# `make test`: the whole suite against a real PostgreSQL and Redis: those named by
# DATABASE_URL/REDIS_URL, else the local ones on their standard ports, else throwaway servers
# started from installed binaries (see scripts/services.sh). Stops with a message naming what
# to install when none can be had. Arguments go to pytest: make test ARGS="apps/fleet -x".
# Each run gets its own test database and, unless REDIS_URL was given, its own Redis database
# (crosslogic/settings_test.py), so two runs on one machine do not disturb each other.
set -euo pipefail
cd "$(dirname "$0")/.."
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "test: error: needs bash 4.4 or newer (this is $BASH_VERSION; macOS: brew install bash)" >&2
  exit 1
fi
source scripts/services.sh
if [[ -z ${REDIS_URL:-} ]]; then export TEST_REDIS_DB=${TEST_REDIS_DB:-auto}; fi
ensure_postgres
ensure_redis
export DATABASE_URL REDIS_URL
echo "test: PostgreSQL at ${DATABASE_URL%%\?*}, Redis at $REDIS_URL"

# Not exec: the EXIT trap must still stop any throwaway servers after pytest.
status=0
.venv/bin/pytest "$@" || status=$?
if [[ $status == 5 ]]; then
  echo "test: error: pytest collected no tests (exit 5); check the paths or -k expression" >&2
  exit 1
fi
exit "$status"
