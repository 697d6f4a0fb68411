"""Settings for pytest only (pyproject's DJANGO_SETTINGS_MODULE); the servers keep crosslogic.settings.

Two things differ from the runtime settings:
- passwords are hashed with MD5: PBKDF2's 1,000,000 iterations cost ~0.3 s per staff user created
  or logged in, which added up to a large share of the suite; no test checks the hash strength;
- each run gets its own test database name and, with TEST_REDIS_DB=auto (what `make test` sets
  unless REDIS_URL was given), its own Redis database, so two runs on one machine do not wipe or
  deadlock each other. Both are chosen before crosslogic.settings is read and written back to the
  environment, so the processes the tests start (workers, gateways) use the same ones.
"""

from __future__ import annotations

import atexit
import os
import secrets
import threading
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured

# Lock keys live in Redis database 0 of the same server; a run refreshes its key every
# _HEARTBEAT_S, so the database of a run that was killed is free again after _LOCK_TTL_S.
_LOCK_KEY = "crosslogic:test-run:redis-db:{index}"
_LOCK_TTL_S = 90
_HEARTBEAT_S = 20


def _database_count(client) -> int:
    try:
        return int(client.config_get("databases")["databases"])
    except Exception:  # CONFIG may be disabled (managed Redis): assume the default
        return 16


def claim_redis_db(url: str) -> tuple[str, int]:
    """Claim a Redis database no other run holds; return the URL naming it and its index.

    The first pass takes only empty databases, so a run that names its database explicitly
    (and so takes no lock) is not trampled; the second takes any unlocked one and empties it.
    """
    import redis

    parts = urlparse(url)
    if parts.scheme not in {"redis", "rediss"}:
        raise ImproperlyConfigured(f"TEST_REDIS_DB=auto needs a redis:// or rediss:// REDIS_URL, not {parts.scheme}://")
    lock_client = redis.Redis.from_url(parts._replace(path="/0").geturl(), socket_connect_timeout=5)
    token = f"{os.getpid()}-{secrets.token_hex(8)}"
    index = claim_index(lock_client, lambda i: redis.Redis.from_url(parts._replace(path=f"/{i}").geturl()), token)
    _hold(lock_client, _LOCK_KEY.format(index=index), token)
    return parts._replace(path=f"/{index}").geturl(), index


def claim_index(lock_client, database, token: str) -> int:
    """Lock (in lock_client's database) the first free Redis database and return its index;
    ``database(i)`` is a client of database i."""
    count = _database_count(lock_client)
    for only_empty in (True, False):
        for index in range(1, count):
            key = _LOCK_KEY.format(index=index)
            if not lock_client.set(key, token, nx=True, ex=_LOCK_TTL_S):
                continue
            claimed = database(index)
            if only_empty and claimed.dbsize():
                lock_client.delete(key)
                continue
            claimed.flushdb()  # leftovers of a killed run
            return index
    raise ImproperlyConfigured(f"TEST_REDIS_DB=auto: all {count - 1} Redis databases are held by other test runs")


def _hold(client, key: str, token: str) -> None:
    """Refresh the lock while this process lives; release it at exit (only if still ours)."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(_HEARTBEAT_S):
            try:
                if client.get(key) == token.encode():
                    client.expire(key, _LOCK_TTL_S)
            except Exception:  # noqa: S110 - Redis briefly down (some tests stop it): the next beat retries
                pass

    def release() -> None:
        stop.set()
        try:
            if client.get(key) == token.encode():
                client.delete(key)
        except Exception:  # noqa: S110 - the lock expires on its own
            pass

    threading.Thread(target=beat, name="test-redis-db-lock", daemon=True).start()
    atexit.register(release)


# pytest's pid keeps the name unique per run; pytest-django drops the database at the end.
os.environ.setdefault("TEST_DB_SUFFIX", f"_{os.getpid()}")
if os.environ.get("TEST_REDIS_DB") == "auto" and os.environ.get("REDIS_URL"):
    os.environ["REDIS_URL"], _index = claim_redis_db(os.environ["REDIS_URL"])
    os.environ["TEST_REDIS_DB"] = str(_index)  # a nested run (tests/test_make.py) claims no second one

from crosslogic.settings import *  # noqa: E402, F403

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
