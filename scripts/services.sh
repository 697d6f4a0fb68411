# Sourced by test.sh and bench.sh: find or start PostgreSQL and Redis for the test run.
# shellcheck shell=bash

_port_open() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

_free_port() { .venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

ensure_postgres() {
  if [[ -n "${DATABASE_URL:-}" ]]; then return; fi
  if _port_open 127.0.0.1 5432; then
    export DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres"
    return
  fi
  local bindir
  bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  if [[ -z "$bindir" || ! -x "$bindir/initdb" ]]; then
    echo "error: no PostgreSQL reachable on 127.0.0.1:5432, DATABASE_URL unset, and no server binaries" >&2
    echo "       to start one. Install PostgreSQL (Debian: apt-get install postgresql) or set DATABASE_URL." >&2
    exit 2
  fi
  local dir port
  dir=$(mktemp -d "${TMPDIR:-/tmp}/crosslogic-pg.XXXXXX")
  port=$(_free_port)
  local runas=()
  if [[ $(id -u) == 0 ]]; then chown -R nobody "$dir"; runas=(runuser -u nobody --); fi
  "${runas[@]}" "$bindir/initdb" -D "$dir/data" -U postgres -A trust >/dev/null
  "${runas[@]}" "$bindir/pg_ctl" -D "$dir/data" -o "-p $port -k $dir -c listen_addresses=127.0.0.1" -l "$dir/log" -w start >/dev/null
  trap "${runas[*]} $bindir/pg_ctl -D $dir/data -m fast stop >/dev/null 2>&1; rm -rf $dir; ${_REDIS_STOP:-true}" EXIT
  export _PG_STOP="${runas[*]} $bindir/pg_ctl -D $dir/data -m fast stop"
  export DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
  echo "test: started a throwaway PostgreSQL on port $port"
}

ensure_redis() {
  if [[ -n "${REDIS_URL:-}" ]]; then return; fi
  if _port_open 127.0.0.1 6379; then
    # Database 15 keeps test keys away from a developer's own data on db 0.
    export REDIS_URL="redis://127.0.0.1:6379/15"
    return
  fi
  if ! command -v redis-server >/dev/null; then
    echo "error: no Redis reachable on 127.0.0.1:6379, REDIS_URL unset, and no redis-server binary." >&2
    echo "       Install Redis (Debian: apt-get install redis-server) or set REDIS_URL." >&2
    exit 2
  fi
  local port
  port=$(_free_port)
  redis-server --port "$port" --bind 127.0.0.1 --save "" --appendonly no --daemonize yes \
    --pidfile "/tmp/crosslogic-redis-$port.pid" >/dev/null
  export _REDIS_STOP="kill \$(cat /tmp/crosslogic-redis-$port.pid)"
  trap "${_PG_STOP:-true}; ${_REDIS_STOP}" EXIT
  export REDIS_URL="redis://127.0.0.1:$port/0"
  echo "test: started a throwaway Redis on port $port"
}
