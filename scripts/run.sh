#!/usr/bin/env bash
# `make run`: the whole control plane on one machine for development.
#
# Migrates, creates the demo data, then runs the ASGI server (uvicorn), a Celery worker and
# Celery beat side by side until Ctrl-C, which stops all three and waits for them.
# Defaults need nothing installed: SQLite under var/ and kombu's filesystem broker under var/.
# DATABASE_URL / REDIS_URL (environment or .env) switch to PostgreSQL / Redis;
# CROSSLOGIC_VAR_DIR moves var/ (SQLite, broker folders, local nodes' logs).
#   PORT (default 8000), HOST (default 127.0.0.1), WEB_CONCURRENCY (uvicorn workers, default 1),
#   CELERY_CONCURRENCY (worker processes, default 2).
set -euo pipefail
cd "$(dirname "$0")/.."
if ((BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404)); then
  echo "run: error: needs bash 4.4 or newer (this is $BASH_VERSION; macOS: brew install bash)" >&2
  exit 1
fi

BIN=.venv/bin
PORT=${PORT:-8000}
HOST=${HOST:-127.0.0.1}
export DJANGO_SETTINGS_MODULE=crosslogic.settings
export PYTHONUNBUFFERED=1
# Local-launcher nodes register with this URL: follow the port chosen here unless set explicitly.
export CONTROL_PLANE_URL=${CONTROL_PLANE_URL:-http://$HOST:$PORT}

say() { printf 'run: %s\n' "$*"; }

port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

if port_open "$HOST" "$PORT"; then
  say "error: port $PORT on $HOST is already in use; stop what runs there or choose another: PORT=8001 make run" >&2
  exit 1
fi

# One Django start to read what the rest of the script needs (also fails fast on bad settings).
IFS=$'\t' read -r DEBUG_ON DB_DESC BROKER_DESC VAR_DIR < <(
  "$BIN/python" - <<'PY'
import django
from django.conf import settings
django.setup()
db = settings.DATABASES["default"]
engine = db["ENGINE"].rsplit(".", 1)[-1]
where = db["NAME"] if engine == "sqlite3" else f'{db.get("HOST") or "localhost"}:{db.get("PORT") or 5432}/{db["NAME"]}'
broker = settings.CELERY_BROKER_URL.split("://", 1)[0]
print(int(settings.DEBUG), f"{engine}:{where}", broker, settings.VAR_DIR, sep="\t")
PY
)
mkdir -p "$VAR_DIR"
say "database $DB_DESC, Celery broker $BROKER_DESC"

"$BIN/python" manage.py migrate --noinput

# bootstrap_demo prints the demo login and API key; keep its output for the banner. In development
# it also writes DEMO_USAGE_DAYS (default 1; 0 = none) of synthetic usage so the dashboard has charts.
DEMO_ARGS=()
if [[ "$DEBUG_ON" == 1 && "${DEMO_USAGE_DAYS:-1}" != 0 ]]; then
  DEMO_ARGS=(--synthetic-usage-days "${DEMO_USAGE_DAYS:-1}")
fi
DEMO_OUT=""
if DEMO_OUT=$("$BIN/python" manage.py bootstrap_demo "${DEMO_ARGS[@]}" 2>&1); then
  :
elif grep -q "Unknown command" <<<"$DEMO_OUT"; then
  DEMO_OUT="(bootstrap_demo is not available in this checkout: create a superuser with
 .venv/bin/python manage.py createsuperuser)"
else
  printf '%s\n' "$DEMO_OUT" >&2
  say "error: bootstrap_demo failed (above)" >&2
  exit 1
fi

if [[ "$DEBUG_ON" == 0 ]]; then
  # With DEBUG off, WhiteNoise serves only collected, hashed files.
  "$BIN/python" manage.py collectstatic --noinput >/dev/null
fi

# Each child runs in its own process group (job control on), so Ctrl-C reaches this script
# only and the cleanup below stops every child in order, including the worker's pool processes.
set -m
PIDS=()
start() { "$@" & PIDS+=($!); }

STOPPING=0
cleanup() {
  local status=${1:-0}
  [[ $STOPPING == 1 ]] && return
  STOPPING=1
  trap '' INT TERM
  set +m  # no job-status chatter while the children go
  say "stopping..."
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  # Give each a warm shutdown (the worker finishes its current task), then force the group.
  local deadline=$((SECONDS + 15))
  for pid in "${PIDS[@]}"; do
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
  done
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Local-launcher nodes (simulator processes) are detached, like machines: stop them too, now
  # that no worker or reconciler can start new ones.
  local out
  local limit=()
  command -v timeout >/dev/null && limit=(timeout 60)
  if ! out=$("${limit[@]}" "$BIN/python" manage.py stop_local_nodes 2>&1) && ! grep -q "Unknown command" <<<"$out"; then
    printf '%s\n' "$out" >&2
    say "warning: stop_local_nodes failed (above); local simulator nodes may still run" >&2
  elif ! grep -q "Unknown command" <<<"$out"; then
    printf '%s\n' "$out"
  fi
  say "stopped"
  exit "$status"
}
trap 'cleanup 130' INT
trap 'cleanup 143' TERM
trap 'cleanup $?' EXIT

start "$BIN/python" -m crosslogic.serve --host "$HOST" --port "$PORT" --workers "${WEB_CONCURRENCY:-1}"
start "$BIN/celery" -A crosslogic worker --loglevel INFO --concurrency "${CELERY_CONCURRENCY:-2}" \
  --hostname "crosslogic-dev@%h"
start "$BIN/celery" -A crosslogic beat --loglevel INFO --scheduler apps.core.beat:SingleBeatScheduler

# Wait for the web server before printing where to go.
for _ in $(seq 1 150); do
  port_open "$HOST" "$PORT" && break
  kill -0 "${PIDS[0]}" 2>/dev/null || break
  sleep 0.2
done
if ! port_open "$HOST" "$PORT"; then
  say "error: the web server did not start (see its output above)" >&2
  exit 1
fi

cat <<EOF

==========================================================================================
 CrossLogic is running (Ctrl-C stops everything)
   Admin:        http://$HOST:$PORT/admin/
   API docs:     http://$HOST:$PORT/api/docs/
   OpenAI API:   http://$HOST:$PORT/v1/
   Database:     $DB_DESC
   Celery:       worker + beat on the $BROKER_DESC broker
 Demo data:
$(sed 's/^/   /' <<<"$DEMO_OUT")
==========================================================================================

EOF

# Stop everything as soon as any one of the three exits on its own.
set +e
wait -n "${PIDS[@]}"
status=$?
if [[ $STOPPING == 0 ]]; then
  say "a process exited (status $status); stopping the others" >&2
  cleanup 1
fi
