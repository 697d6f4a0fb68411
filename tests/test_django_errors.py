"""Errors Django raises outside a DRF view: JSON under /api/, Django's pages elsewhere (issue #11, item 9)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied
from django.test import override_settings
from django.urls import path
from rest_framework.test import APIClient

from apps.tenancy.services import staff_token_issue
from crosslogic import urls as project_urls

pytestmark = pytest.mark.django_db

ROOT = Path(__file__).resolve().parent.parent
SERVER_PEPPER = secrets.token_urlsafe(24)  # the real server runs with DEBUG off, which refuses the dev pepper


def _boom(request):
    raise RuntimeError("an unexpected failure outside DRF")


def _forbidden(request):
    raise PermissionDenied


# The project's URLs and error handlers, plus two views that fail without DRF's handler.
urlpatterns = [
    path("api/v1/test-boom/", _boom),
    path("dashboard-boom/", _boom),
    path("api/v1/test-forbidden/", _forbidden),
    *project_urls.urlpatterns,
]
handler400 = project_urls.handler400
handler403 = project_urls.handler403
handler404 = project_urls.handler404
handler500 = project_urls.handler500


@pytest.fixture
def staff() -> APIClient:
    user = User.objects.create_user("ops", password="pw-ops-1", is_staff=True, is_superuser=True)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {staff_token_issue(user=user, name='t')[1]}")
    return client


def _json_error(response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.content[:200])
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    error = response.json()["error"]
    assert set(error) == {"message", "type"} and error["message"] and error["type"]
    return error


def _html(response, status: int) -> None:
    assert response.status_code == status, (response.status_code, response.content[:200])
    assert response["Content-Type"].startswith("text/html"), response["Content-Type"]


@override_settings(DEBUG=False)
def test_an_unknown_api_url_is_a_json_404_and_other_paths_keep_the_html_page(staff):
    error = _json_error(staff.get("/api/v1/no-such-thing/"), 404)
    assert error["type"] == "not_found" and "/api/v1/no-such-thing/" in error["message"]
    _json_error(staff.get("/api/nope"), 404)
    _html(staff.get("/no-such-page/"), 404)


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
@pytest.mark.parametrize("content_type", ["application/json", "application/x-www-form-urlencoded"])
def test_a_body_beyond_data_upload_max_memory_size_is_a_json_400(staff, content_type):
    body = b'{"name": "' + b"a" * 5000 + b'"}' if content_type == "application/json" else b"name=" + b"a" * 5000
    error = _json_error(staff.generic("POST", "/api/v1/tenants/", body, content_type=content_type), 400)
    assert error["type"] == "invalid_request" and "1000 bytes" in error["message"]


@override_settings(DATA_UPLOAD_MAX_MEMORY_SIZE=1000)
def test_an_oversize_admin_form_keeps_djangos_html_400(client):
    _html(client.post("/admin/login/", {"username": "a" * 5000, "password": "x"}), 400)


@override_settings(ROOT_URLCONF=__name__, DEBUG=False)
def test_an_uncaught_exception_outside_drf_is_a_json_500_under_api_and_html_elsewhere(staff):
    error = _json_error(staff.get("/api/v1/test-boom/"), 500)
    assert error["type"] == "server_error" and "RuntimeError" not in error["message"]
    _html(staff.get("/dashboard-boom/"), 500)


@override_settings(DEBUG=False, ALLOWED_HOSTS=["testserver"])
def test_a_disallowed_host_is_a_json_400_under_api_that_does_not_echo_the_host(staff):
    error = _json_error(staff.get("/api/v1/tenants/", HTTP_HOST="evil.example"), 400)
    assert "evil" not in error["message"]
    _html(staff.get("/admin/login/", HTTP_HOST="evil.example"), 400)


@override_settings(ROOT_URLCONF=__name__, DEBUG=False)
def test_permission_denied_outside_drf_is_a_json_403_under_api(staff):
    assert _json_error(staff.get("/api/v1/test-forbidden/"), 403)["type"] == "permission_denied"


# --- a client that leaves during the body upload, against `python -m crosslogic.serve` -----------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def logged_server(django_db_setup, django_db_blocker, tmp_path_factory) -> Iterator[tuple[tuple[str, int], Path]]:
    from django.db import connection

    db = connection.settings_dict
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")},  # DEBUG off refuses a half setup
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",  # DATABASE_URL below names the test database
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "CROSSLOGIC_ENV_FILE": "",
        "LOG_LEVEL": "INFO",
        # Production-like: with DEBUG on, Django answers with its technical pages for developers.
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "API_KEY_PEPPER": SERVER_PEPPER,  # committed_staff_token issues its token with it
        "ALLOWED_HOSTS": "127.0.0.1",
        "SECURE_SSL_REDIRECT": "false",  # plain http on loopback; TLS is the reverse proxy's
    }
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crosslogic.serve", "--port", str(port), "--log-level", "info", "--no-access-log"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                    if s.recv(100).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("python -m crosslogic.serve did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.2)
        yield ("127.0.0.1", port), log_path
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _leave_mid_upload(server: tuple[str, int], path: str, content_type: str, reset: bool) -> None:
    with socket.create_connection(server, timeout=5) as s:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: 100000\r\n\r\n".encode()
            + b"x" * 1000
        )
        time.sleep(0.3)  # the application is waiting for the rest of the body
        if reset:  # an RST instead of a FIN: what a killed client or a dropped network looks like
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def _log_lines_about(log_path: Path, needle: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        lines = [line for line in log_path.read_text().splitlines() if needle in line]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "content_type", "reset"),
    [
        ("/api/v1/tenants/", "application/json", False),
        ("/api/v1/keys/", "application/json", True),
        ("/admin/login/", "multipart/form-data; boundary=xx", False),
    ],
)
def test_a_client_leaving_during_the_upload_logs_one_info_line_and_no_traceback(
    logged_server, path, content_type, reset
):
    server, log_path = logged_server
    before = log_path.read_text()
    _leave_mid_upload(server, path, content_type, reset)
    lines = _log_lines_about(log_path, f"body of POST {path} ", 1)
    time.sleep(0.3)  # anything logged after the line (a traceback) would be here by now
    new = log_path.read_text()[len(before) :]
    assert len([line for line in new.splitlines() if f"body of POST {path} " in line]) == 1, new
    assert " INFO crosslogic.server: client 127.0.0.1:" in lines[0] and "(1000 bytes received)" in lines[0]
    assert "Traceback" not in new and " ERROR " not in new, new
    with socket.create_connection(server, timeout=5) as s:  # and the server serves the next client
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 200")


@pytest.fixture
def committed_staff_token(transactional_db, settings) -> str:
    """A staff token the server process can see: committed (transactional_db empties the tables after)."""
    settings.API_KEY_PEPPER = SERVER_PEPPER
    user = User.objects.create_user("fault-ops", password="pw-ops-1", is_staff=True)
    return staff_token_issue(user=user, name="faults")[1]


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_an_oversize_body_to_the_api_is_a_json_400_from_the_real_server(logged_server, committed_staff_token):
    from django.conf import settings

    server, _ = logged_server
    body = b'{"slug": "' + b"a" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 10) + b'"}'
    with socket.create_connection(server, timeout=20) as s:
        s.sendall(
            b"POST /api/v1/tenants/ HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + committed_staff_token.encode() + b"\r\n"
            b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), head[:200]
    assert b"content-type: application/json" in head.lower()
    error = json.loads(payload)["error"]
    assert error["type"] == "invalid_request" and f"{settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes" in error["message"]


@pytest.mark.slow
def test_an_unknown_api_url_is_a_json_404_from_the_real_server(logged_server):
    server, _ = logged_server
    with socket.create_connection(server, timeout=20) as s:
        s.sendall(b"GET /api/v1/no-such-thing/ HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 "), head[:200]
    assert json.loads(payload)["error"]["type"] == "not_found"
