"""The HTTP edge (crosslogic/server.py) against a real server process: `python -m crosslogic.serve`.

Raw sockets, because every case here is something a well-behaved HTTP client would never send.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
HEADER_TIMEOUT_S = 1.0
KEEPALIVE_S = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(django_db_setup, django_db_blocker) -> Iterator[tuple[str, int]]:
    from django.db import connection

    db = connection.settings_dict
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "HTTP_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
        "HTTP_KEEPALIVE_S": str(KEEPALIVE_S),
        "CROSSLOGIC_ENV_FILE": "",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "crosslogic.serve", "--port", str(port), "--log-level", "warning", "--no-access-log"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if _read_all(s).startswith(b"HTTP/1.1 200"):
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail("python -m crosslogic.serve did not start")
        time.sleep(0.2)
    yield "127.0.0.1", port
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def _read_all(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Everything until the server closes the connection (fails the test if it never does)."""
    sock.settimeout(timeout)
    chunks = []
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _json_error(response: bytes, status: int) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(f"HTTP/1.1 {status} ".encode()), head[:80]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _health_ok(server: tuple[str, int]) -> bool:
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        return _read_all(s).startswith(b"HTTP/1.1 200")


def test_an_oversized_header_is_refused_with_431_before_it_is_read_whole(server):
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        sent = 0
        try:  # 10 MB offered; the server must stop reading long before
            while sent < 10_000_000:
                s.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = _read_all(s)
    assert sent < 10_000_000 or response, "the server read 10 MB of header"
    _json_error(response, 431)
    assert _health_ok(server)


def test_too_many_headers_are_refused_with_431(server):
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        _json_error(_read_all(s), 431)


def test_a_head_that_never_finishes_gets_408_after_the_header_timeout(server):
    with socket.create_connection(server, timeout=5) as s:
        started = time.monotonic()
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        response = _read_all(s)
        waited = time.monotonic() - started
    _json_error(response, 408)
    assert HEADER_TIMEOUT_S * 0.8 < waited < HEADER_TIMEOUT_S + 3


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(server):
    with socket.create_connection(server, timeout=5) as s:
        started = time.monotonic()
        assert _read_all(s) == b""
        assert time.monotonic() - started < HEADER_TIMEOUT_S + 3


def test_an_idle_keep_alive_connection_is_closed(server):
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        response = _read_all(s)  # the 200, then the close once the keep-alive runs out
        assert response.startswith(b"HTTP/1.1 200")
        assert time.monotonic() - started < KEEPALIVE_S + 3


def test_a_trickle_of_empty_lines_does_not_keep_a_connection_open(server):
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.3)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < HEADER_TIMEOUT_S + KEEPALIVE_S + 3:
            try:
                s.sendall(b"\r\n")
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            time.sleep(0.2)
        assert closed, "the connection stayed open while the client sent bare CRLFs"


def test_malformed_http_gets_a_json_400(server):
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(b"NOT HTTP AT ALL\x00\x01\r\n\r\n")
        _json_error(_read_all(s), 400)


def test_a_large_body_in_the_same_read_as_the_head_is_not_mistaken_for_a_large_head(server):
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 200_000}]}).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(head + body)
        response = _read_all(s)
    # No key: the gateway's own 401, so the request got past the edge.
    assert response.startswith(b"HTTP/1.1 401"), response[:80]
