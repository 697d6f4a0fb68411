"""storage.py error mapping and transient-failure retries, through a flaky proxy in front of moto."""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

import pytest
from botocore.exceptions import ClientError

from apps.catalog import storage
from apps.catalog.models import UploadStatus
from apps.catalog.uploads import upload_execute, upload_request

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FlakyProxy:
    """Forwards to moto, but answers 503 SlowDown to the first ``failures`` writes of ``key_suffix``."""

    def __init__(self, upstream: str) -> None:
        self.upstream = urlparse(upstream)
        self.key_suffix = ""
        self.failures = 0
        self.writes_seen = 0
        self.lock = threading.Lock()


def _handler(proxy: FlakyProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _forward(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.split("?", 1)[0]
            if self.command == "PUT" and proxy.key_suffix and path.endswith(proxy.key_suffix):
                with proxy.lock:
                    proxy.writes_seen += 1
                    fail = proxy.writes_seen <= proxy.failures
                if fail:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(SLOW_DOWN)
                    return
            upstream = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
            headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
            upstream.request(self.command, self.path, body=body, headers=headers)
            response = upstream.getresponse()
            data = response.read()
            self.send_response(response.status)
            for name, value in response.getheaders():
                if name.lower() not in {"transfer-encoding", "connection", "content-length"}:
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            upstream.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward  # noqa: N815 - http.server's naming

    return Handler


@pytest.fixture
def flaky(r2, settings, moto_endpoint):
    proxy = FlakyProxy(moto_endpoint)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(proxy))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings.R2_ENDPOINT_URL = f"http://127.0.0.1:{server.server_address[1]}"
    settings.UPLOAD_RETRY_BACKOFF_S = 0.1
    yield proxy
    server.shutdown()
    server.server_close()


pytestmark = [pytest.mark.django_db, pytest.mark.slow]  # starts moto_server, a subprocess


def test_transient_errors_are_retried_per_request_and_per_file(flaky, settings, r2, catalog_model, model_folder):
    # R2_MAX_ATTEMPTS=2: botocore gives up after two 503s; the file-level retry then gets it through.
    flaky.key_suffix, flaky.failures = "/tokenizer.json", 3

    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/flaky")
    assert upload_execute(upload_id=catalog_model.latest_upload.pk) == "uploaded"

    assert flaky.writes_seen == 4  # 2 + 2 attempts: the first file attempt failed, the retry went through
    assert storage.get_bytes(r2, "models/flaky/tokenizer.json") == (model_folder / "tokenizer.json").read_bytes()
    catalog_model.refresh_from_db()
    upload = catalog_model.latest_upload
    assert upload.bytes_done == catalog_model.total_bytes  # the rewound bytes were not double-counted


def test_a_store_that_keeps_failing_ends_in_failed_with_the_reason(flaky, settings, catalog_model, model_folder):
    flaky.key_suffix, flaky.failures = "/config.json", 100

    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/down")
    assert upload_execute(upload_id=catalog_model.latest_upload.pk) == "failed"

    catalog_model.refresh_from_db()
    upload = catalog_model.latest_upload
    assert upload.status == UploadStatus.FAILED
    assert "temporarily failing" in upload.error and "SlowDown" in upload.error
    assert flaky.writes_seen == settings.R2_MAX_ATTEMPTS * (settings.UPLOAD_FILE_RETRIES + 1)


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


@pytest.mark.parametrize(
    ("code", "status", "kind", "hint"),
    [
        ("AccessDenied", 403, storage.StorageAccessDeniedError, "Object Read & Write"),
        ("SignatureDoesNotMatch", 403, storage.StorageBadCredentialsError, "R2_SECRET_ACCESS_KEY"),
        ("NoSuchBucket", 404, storage.StorageBucketMissingError, "--create-bucket"),
        ("InternalError", 500, storage.StorageTransientError, "temporarily"),
    ],
)
def test_store_error_codes_map_to_readable_domain_errors(settings, code, status, kind, hint):
    error = storage.translate(_client_error(code, status), bucket="weights", key="m/config.json")
    assert isinstance(error, kind) and hint in str(error)


def test_parse_uri():
    assert storage.parse_uri("s3://weights/models/a/b/") == ("weights", "models/a/b")
    with pytest.raises(ValueError, match="not an s3://"):
        storage.parse_uri("https://weights/models")
