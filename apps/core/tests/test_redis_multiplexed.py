"""The gateway's shared Redis connection against the real Redis: replies reach the right caller
under concurrency, errors stay per command, and a lost connection is replaced."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest
from django.conf import settings

from apps.core.redis import Multiplexed, RedisReplyError, multiplexed


@pytest.fixture
async def conn(redis_db):
    made = multiplexed()
    yield made
    await made.aclose()


async def test_a_thousand_concurrent_commands_each_get_their_own_reply(conn, redis_db):
    # The point is which reply each command gets, not speed. Connect first: on a busy machine (two
    # test runs at once) the burst's other 999 tasks outran the 0.5 s connect timeout of the first.
    await conn.execute("PING", timeout_s=15)
    await asyncio.gather(*(conn.execute("SET", f"k{i}", f"v{i}", timeout_s=15) for i in range(1000)))

    replies = await asyncio.gather(*(conn.execute("GET", f"k{i}", timeout_s=15) for i in range(1000)))

    assert replies == [f"v{i}".encode() for i in range(1000)]
    assert redis_db.get("k999") == b"v999"  # the URL's database was selected, like every other client's


async def test_an_error_reply_fails_only_its_own_command(conn):
    ok, bad, after = await asyncio.gather(
        conn.execute("SET", "n", "1", timeout_s=2),
        conn.execute("INCRBY", "n", "not-a-number", timeout_s=2),
        conn.execute("INCR", "n", timeout_s=2),
        return_exceptions=True,
    )

    assert ok == b"OK" and after == 2
    assert isinstance(bad, RedisReplyError) and "not an integer" in str(bad)


async def test_a_killed_connection_fails_what_was_in_flight_and_the_next_command_reconnects(conn, redis_db):
    name = f"mux-{uuid.uuid4().hex[:8]}"
    await conn.execute("CLIENT", "SETNAME", name, timeout_s=2)
    blocked = asyncio.ensure_future(conn.execute("BLPOP", "never", 5, timeout_s=10))  # in flight when killed
    await asyncio.sleep(0.1)

    killed = [c for c in redis_db.client_list() if c.get("name") == name]
    assert len(killed) == 1
    redis_db.execute_command("CLIENT", "KILL", "ID", killed[0]["id"])

    with pytest.raises(ConnectionError):
        await blocked
    assert await conn.execute("PING", timeout_s=2) == b"PONG"


async def test_a_command_past_its_deadline_fails_with_what_queued_behind_it_and_the_next_reconnects(conn):
    loop = asyncio.get_running_loop()
    await conn.execute("PING", timeout_s=2)
    started = loop.time()
    stuck = asyncio.ensure_future(conn.execute("BLPOP", "never", 5, timeout_s=0.3))
    behind = asyncio.ensure_future(conn.execute("PING", timeout_s=10))  # answered only after BLPOP

    with pytest.raises(TimeoutError):
        await stuck
    assert 0.25 <= loop.time() - started < 3
    with pytest.raises(TimeoutError):
        await behind
    assert await conn.execute("PING", timeout_s=2) == b"PONG"


async def test_a_shorter_deadline_behind_a_longer_one_is_kept(conn):
    loop = asyncio.get_running_loop()
    await conn.execute("PING", timeout_s=2)
    long_wait = asyncio.ensure_future(conn.execute("BLPOP", "never", 5, timeout_s=30))
    await asyncio.sleep(0.05)
    started = loop.time()
    with pytest.raises(TimeoutError):
        await conn.execute("PING", timeout_s=0.3)
    assert loop.time() - started < 3  # not the 30 s of the command in front
    with pytest.raises(TimeoutError):
        await long_wait


async def test_a_password_in_the_url_is_used(redis_db):
    user, password = f"mux-{uuid.uuid4().hex[:8]}", "s3cret/pw"
    redis_db.execute_command("ACL", "SETUSER", user, "on", f">{password}", "~*", "+@all")
    parts = urlsplit(settings.REDIS_URL)
    host = f"{parts.hostname}:{parts.port or 6379}"
    try:
        good = Multiplexed(urlunsplit(parts._replace(netloc=f"{user}:s3cret%2Fpw@{host}")))
        assert await good.execute("ACL", "WHOAMI", timeout_s=2) == user.encode()
        await good.aclose()
        bad = Multiplexed(urlunsplit(parts._replace(netloc=f"{user}:wrong@{host}")))
        with pytest.raises(RedisReplyError, match="WRONGPASS"):
            await bad.execute("PING", timeout_s=2)
        await bad.aclose()
    finally:
        redis_db.execute_command("ACL", "DELUSER", user)


def test_urls_are_read_like_redis_py_reads_them():
    tcp = Multiplexed("rediss://app:p%40ss@cache.internal:6380/3")
    sock = Multiplexed("unix:///run/redis/redis.sock?db=2&password=pw")

    assert (tcp.host, tcp.port, tcp.db, tcp.username, tcp.password, tcp.tls) == (
        "cache.internal",
        6380,
        3,
        "app",
        "p@ss",
        True,
    )
    assert (sock.socket_path, sock.db, sock.password) == ("/run/redis/redis.sock", 2, "pw")
    with pytest.raises(ValueError, match="redis://, rediss:// or unix://"):
        Multiplexed("memcached://cache:11211")
