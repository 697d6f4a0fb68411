# Sourced by test.sh and bench.sh: find or start the PostgreSQL and Redis a run needs.
#
#   ensure_postgres / ensure_redis export DATABASE_URL / REDIS_URL, taking the first that works:
#     1. the variable already set (environment or .env is NOT read here: export it);
#     2. a server on 127.0.0.1 at the standard port (CROSSLOGIC_PG_PORT, default 5432;
#        CROSSLOGIC_REDIS_PORT, default 6379);
#     3. a throwaway server started from installed binaries in a temporary folder, stopped and
#        deleted when the calling script exits (services_cleanup runs from an EXIT trap; a
#        script that sets its own EXIT trap must call services_cleanup from it);
#     4. otherwise: exit 2 with a message naming what to install.
#   CROSSLOGIC_PG_BINDIR (a folder holding initdb and pg_ctl) and CROSSLOGIC_REDIS_SERVER (a
#   redis-server binary) choose the binaries for step 3 instead of searching for them.
# shellcheck shell=bash

_SERVICES_CLEANUP=()

services_cleanup() {
  local cmd
  for cmd in "${_SERVICES_CLEANUP[@]}"; do eval "$cmd" >/dev/null 2>&1 || true; done
  _SERVICES_CLEANUP=()
}
trap services_cleanup EXIT
# A signal ends the script through the EXIT trap, so the throwaway servers go with it.
trap 'exit 130' INT
trap 'exit 143' TERM

_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_free_port() {
  local py
  py=$(command -v python3 || echo .venv/bin/python)
  "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

_stop_pidfile() {  # pidfile: TERM the process and wait (5 s at most) for it to go
  [[ -f "$1" ]] || return 0
  local pid i
  pid=$(cat "$1")
  kill "$pid" 2>/dev/null || return 0
  for ((i = 0; i < 50; i++)); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
}

_wait_port() {  # host port seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do _port_open "$1" "$2" && return 0; sleep 0.1; done
  return 1
}

_pg_bindir() {
  if [[ -n "${CROSSLOGIC_PG_BINDIR+x}" ]]; then
    [[ -x "$CROSSLOGIC_PG_BINDIR/initdb" && -x "$CROSSLOGIC_PG_BINDIR/pg_ctl" ]] && echo "$CROSSLOGIC_PG_BINDIR"
    return 0
  fi
  if command -v initdb >/dev/null && command -v pg_ctl >/dev/null; then
    dirname "$(command -v initdb)"
    return
  fi
  local dir
  for dir in $(ls -d /usr/lib/postgresql/*/bin /usr/local/pgsql/bin /opt/homebrew/opt/postgresql*/bin \
    /usr/local/opt/postgresql*/bin 2>/dev/null | sort -V -r); do
    if [[ -x "$dir/initdb" && -x "$dir/pg_ctl" ]]; then echo "$dir"; return; fi
  done
}

ensure_postgres() {
  if [[ -n "${DATABASE_URL:-}" ]]; then return; fi
  local std_port=${CROSSLOGIC_PG_PORT:-5432}
  if _port_open 127.0.0.1 "$std_port"; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:$std_port/postgres"
    return
  fi
  local bindir
  bindir=$(_pg_bindir)
  if [[ -z "$bindir" ]]; then
    echo "error: no PostgreSQL: DATABASE_URL is unset, nothing listens on 127.0.0.1:$std_port, and no" >&2
    echo "       server binaries (initdb, pg_ctl) are installed to start a throwaway one." >&2
    echo "       Install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql;" >&2
    echo "       macOS: brew install postgresql) or export DATABASE_URL=postgres://user:pass@host:port/db" >&2
    exit 2
  fi
  local dir port
  dir=$(mktemp -d "${TMPDIR:-/tmp}/crosslogic-pg.XXXXXX")
  port=$(_free_port)
  # initdb refuses to run as root: run the throwaway server as an unprivileged user then.
  local runas=()
  if [[ $(id -u) == 0 ]]; then
    local user
    for user in postgres nobody; do id -u "$user" >/dev/null 2>&1 && break; done
    chown "$user" "$dir"
    runas=(runuser -u "$user" --)
    if ! "${runas[@]}" test -w "$dir"; then
      echo "error: $user cannot reach $dir (its parent folders are private); point TMPDIR at a" >&2
      echo "       folder every user can enter, e.g. TMPDIR=/tmp" >&2
      rm -rf "$dir"
      exit 2
    fi
  fi
  _SERVICES_CLEANUP+=("$(printf '%q ' "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop)")
  _SERVICES_CLEANUP+=("rm -rf $(printf '%q' "$dir")")
  if ! "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust --no-sync >"$dir/initdb.log" 2>&1; then
    cat "$dir/initdb.log" >&2
    echo "error: initdb failed (above)" >&2
    exit 2
  fi
  if ! "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -l "$dir/data/server.log" -w -t 30 \
    -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
    start >/dev/null; then
    cat "$dir/data/server.log" >&2
    echo "error: the throwaway PostgreSQL did not start (log above)" >&2
    exit 2
  fi
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "services: started a throwaway PostgreSQL ($bindir) on port $port"
}

ensure_redis() {
  if [[ -n "${REDIS_URL:-}" ]]; then return; fi
  local std_port=${CROSSLOGIC_REDIS_PORT:-6379}
  if _port_open 127.0.0.1 "$std_port"; then
    # Database 15 keeps test keys away from a developer's own data on database 0.
    export REDIS_URL="redis://127.0.0.1:$std_port/15"
    return
  fi
  local server=${CROSSLOGIC_REDIS_SERVER-$(command -v redis-server || true)}
  if [[ -z "$server" || ! -x "$server" ]]; then
    echo "error: no Redis: REDIS_URL is unset, nothing listens on 127.0.0.1:$std_port, and no" >&2
    echo "       redis-server binary is installed to start a throwaway one." >&2
    echo "       Install Redis (Debian/Ubuntu: apt-get install redis-server; macOS: brew install redis)" >&2
    echo "       or export REDIS_URL=redis://host:port/db" >&2
    exit 2
  fi
  local dir port
  dir=$(mktemp -d "${TMPDIR:-/tmp}/crosslogic-redis.XXXXXX")
  port=$(_free_port)
  _SERVICES_CLEANUP+=("_stop_pidfile $(printf '%q' "$dir/redis.pid")")
  _SERVICES_CLEANUP+=("rm -rf $(printf '%q' "$dir")")
  "$server" --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --dir "$dir" --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" >/dev/null
  if ! _wait_port 127.0.0.1 "$port" 10; then
    cat "$dir/redis.log" >&2
    echo "error: the throwaway Redis did not start (log above)" >&2
    exit 2
  fi
  export REDIS_URL="redis://127.0.0.1:$port/0"
  echo "services: started a throwaway Redis on port $port"
}
