"""deploy/nginx.conf in a real nginx, in front of a small streaming upstream.

The file is the one docker-compose mounts; only what cannot exist here is rewritten: the upstream
host (`web:8000`), the listen ports, the certificate paths and nginx's scratch folders.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
if NGINX is None and os.environ.get("CI"):
    raise RuntimeError("nginx is missing: .ci/run installs it (apt-get install nginx-light)")
if NGINX is None:
    pytest.skip("nginx is not installed (apt-get install nginx-light); CI installs it", allow_module_level=True)

TOKEN_GAP_S = 0.3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Upstream:
    """Plays "web": an SSE stream on /v1/, an echo of what the proxy forwarded, /health."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(3):
            await response.write(b'data: {"token": %d}\n\n' % i)
            await asyncio.sleep(TOKEN_GAP_S)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(
            {
                "xff": request.headers.get("X-Forwarded-For"),
                "proto": request.headers.get("X-Forwarded-Proto"),
                "bytes": len(body),
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_get("/v1/stream", self._stream)
        app.router.add_post("/v1/echo", self._echo)
        app.router.add_get("/api/echo", self._echo)
        app.router.add_get("/health", self._health)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def proxy(tmp_path_factory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("nginx")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(tmp / "privkey.pem"),
            "-out",
            str(tmp / "fullchain.pem"),
        ],
        check=True,
        capture_output=True,
    )
    upstream = Upstream()
    upstream.start()
    http_port, https_port = _free_port(), _free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("server web:8000;", f"server 127.0.0.1:{upstream.port};")
    conf = conf.replace("/etc/nginx/tls/", f"{tmp}/")
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    conf = conf.replace("listen 443 ssl;", f"listen 127.0.0.1:{https_port} ssl;")
    conf = re.sub(r"worker_processes auto;", "worker_processes 1;", conf)
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    scratch = "".join(f"    {kind}_temp_path {tmp}/{kind};\n" for kind in kinds)
    conf = conf.replace("http {\n", "http {\n" + scratch, 1)
    (tmp / "nginx.conf").write_text(conf)
    assert NGINX is not None  # the module is skipped without it
    args = [NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", f"daemon off; pid {tmp}/nginx.pid;"]
    check = subprocess.run([*args[:-2], "-t"], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with open(tmp / "stderr.log", "wb") as stderr:
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", https_port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail((tmp / "stderr.log").read_text())
            time.sleep(0.1)
    yield {
        "https": f"https://127.0.0.1:{https_port}",
        "http": f"http://127.0.0.1:{http_port}",
        "ca": str(tmp / "fullchain.pem"),
        "https_port": https_port,
    }
    proc.terminate()
    proc.wait(10)
    upstream.stop()


def _tls(proxy: dict) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=proxy["ca"])


def test_sse_on_v1_is_passed_through_token_by_token_not_buffered(proxy):
    arrivals = []
    with httpx.Client(verify=_tls(proxy), timeout=10) as client:
        started = time.monotonic()
        with client.stream("GET", proxy["https"] + "/v1/stream") as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data:"):
                    arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 4
    # Buffered, all four would arrive together at the end (~0.9 s).
    assert arrivals[0] < TOKEN_GAP_S
    assert arrivals[1] - arrivals[0] > TOKEN_GAP_S * 0.5


def test_a_body_over_the_limit_is_refused_with_413_before_reaching_web(proxy):
    with httpx.Client(verify=_tls(proxy), timeout=30) as client:
        small = client.post(proxy["https"] + "/v1/echo", content=b"x" * 1024)
        big = client.post(proxy["https"] + "/v1/echo", content=b"x" * (5 * 1024 * 1024))
    assert small.status_code == 200 and small.json()["bytes"] == 1024
    assert big.status_code == 413


def test_an_oversized_header_is_refused(proxy):
    with httpx.Client(verify=_tls(proxy), timeout=10) as client:
        response = client.get(proxy["https"] + "/api/echo", headers={"X-Big": "a" * 20_000})
    assert response.status_code in {400, 431}


def test_the_client_address_cannot_be_spoofed_and_the_scheme_is_forwarded(proxy):
    with httpx.Client(verify=_tls(proxy), timeout=10) as client:
        seen = client.get(proxy["https"] + "/api/echo", headers={"X-Forwarded-For": "6.6.6.6"}).json()
    assert seen == {"xff": "127.0.0.1", "proto": "https", "bytes": 0}


def test_plain_http_redirects_to_https_but_answers_health(proxy):
    with httpx.Client(timeout=10) as client:
        redirect = client.get(proxy["http"] + "/v1/models", headers={"Host": "api.example.com"})
        health = client.get(proxy["http"] + "/health")
    assert redirect.status_code == 308
    assert redirect.headers["location"] == "https://api.example.com/v1/models"
    assert health.status_code == 200


def test_tls_13_is_negotiated(proxy):
    context = ssl.create_default_context(cafile=proxy["ca"])
    with (
        socket.create_connection(("127.0.0.1", proxy["https_port"])) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        assert tls.version() == "TLSv1.3"
