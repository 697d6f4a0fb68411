"""An R2-faithful S3 endpoint for tests: moto's S3 server behind an https front that refuses what R2 refuses.

moto over plain http accepts everything botocore sends, and botocore only takes its riskiest path
(aws-chunked bodies with a trailing checksum) over https. This front terminates TLS with a test CA
(trustme), applies Cloudflare R2's rules, and forwards what passes to moto over loopback http:

- region: SigV4 credentials must be scoped to ``auto`` (``us-east-1`` and empty alias to it; R2 docs,
  "S3 API compatibility > Bucket region"); anything else is ``400 InvalidRegionName``.
- ``aws-chunked`` bodies / ``STREAMING-*`` payload hashes / ``x-amz-trailer`` (botocore >= 1.36 over
  https with the default ``when_supported`` checksums): ``401 Unauthorized``, as R2 answered the
  projects that hit it (amd/gaia#3029, 2026).
- checksum headers R2 does not implement: ``501 NotImplemented`` "Header 'x-amz-checksum-crc32' with
  value '…' not implemented" (Cloudflare's status notice of January 2025, cloudflare-docs#19236).
  Accepted: ``x-amz-checksum-sha256`` on a single PutObject, which R2 checks (``400 BadDigest`` when it
  does not match the body) and records. Everything else (CRC32/CRC32C/CRC64NVME/SHA1 values,
  ``x-amz-sdk-checksum-algorithm`` / ``x-amz-checksum-algorithm`` / ``x-amz-checksum-type`` on
  CreateMultipartUpload, any checksum on UploadPart) is refused: stricter than R2's newest notes on
  composite checksums, never more lenient than what users hit.
- multipart: all parts but the last of one size, the last no larger (R2 docs, "Multipart upload >
  Limitations"), else CompleteMultipartUpload is ``400 InvalidPart`` "All non-trailing parts must have
  the same length."; at most 10,000 parts.
- ListMultipartUploads is answered here, paginated like R2/S3 (``max-uploads`` capped at
  ``list_uploads_page`` = 1000, ``key-marker``/``upload-id-marker``, ``IsTruncated``): moto returns every
  upload in one page whatever is asked, which hid a missing paginator. Tests lower the cap to see
  pagination with a handful of uploads.

Everything the front refuses is counted in ``refusals`` so a test can say what was refused and why.
"""

from __future__ import annotations

import hashlib
import http.client
import re
import ssl
import threading
import xml.etree.ElementTree as ET
from base64 import b64encode
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import trustme

S3_NS = "http://s3.amazonaws.com/doc/2006-03-01/"
R2_REGIONS = {"auto", "us-east-1", ""}
ALLOWED_PUT_CHECKSUMS = {"x-amz-checksum-sha256"}
MAX_PARTS = 10_000
ET.register_namespace("", S3_NS)
_CREDENTIAL_RE = re.compile(r"Credential=[^/]+/\d{8}/([^/]*)/s3/aws4_request")


class R2Front:
    """``with R2Front(upstream="http://127.0.0.1:PORT", workdir=tmp) as front: front.url, front.ca_file``."""

    def __init__(self, *, upstream: str, workdir: Path) -> None:
        self.upstream = urlparse(upstream)
        self.refusals: Counter[str] = Counter()  # "401 Unauthorized PUT aws-chunked" and the like
        self.list_uploads_page = 1000  # R2's (and S3's) cap on ListMultipartUploads' max-uploads
        self.sha256_checked: list[str] = []  # paths of single PUTs whose x-amz-checksum-sha256 matched
        self._parts: dict[str, dict[int, int]] = {}  # upload id -> part number -> size
        # Object paths (/bucket/key) written since reset: PUTs (whole or part) and completions that
        # moto accepted. A resumed upload must not write again what had landed.
        self.writes: Counter[str] = Counter()
        self._lock = threading.Lock()
        ca = trustme.CA()
        self.ca_file = workdir / "r2-front-ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self._context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(self._context)
        self._server = _TLSServer(("127.0.0.1", 0), _handler(self), self._context)
        self.url = f"https://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="r2-front", daemon=True)

    def reset(self) -> None:
        with self._lock:
            self.refusals.clear()
            self.sha256_checked.clear()
            self.writes.clear()
        self.list_uploads_page = 1000

    def __enter__(self) -> R2Front:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # --- bookkeeping used by the handler ------------------------------------------------------
    def refuse(self, reason: str) -> None:
        with self._lock:
            self.refusals[reason] += 1

    def record_part(self, upload_id: str, part: int, size: int) -> None:
        with self._lock:
            self._parts.setdefault(upload_id, {})[part] = size

    def part_sizes(self, upload_id: str) -> dict[int, int]:
        with self._lock:
            return dict(self._parts.get(upload_id, {}))

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._parts.pop(upload_id, None)


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type, context: ssl.SSLContext) -> None:
        self.ssl_context = context
        super().__init__(address, handler)

    def handle_error(self, request, client_address) -> None:
        pass  # a client hanging up mid-request (a cancelled upload) is not news

    def finish_request(self, request, client_address) -> None:
        # The TLS handshake runs here, in the connection's own thread, so one slow client cannot
        # hold up accept() for the others.
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            return
        try:
            self.RequestHandlerClass(tls, client_address, self)
        finally:
            tls.close()


def _error_xml(code: str, message: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message></Error>'
    ).encode()


def _handler(front: R2Front) -> type[BaseHTTPRequestHandler]:
    upstream_local = threading.local()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        # --- what R2 refuses from the headers alone -------------------------------------------
        def _query(self) -> dict[str, list[str]]:
            return parse_qs(urlparse(self.path).query, keep_blank_values=True)

        def _header_refusal(self) -> tuple[int, str, str] | None:
            match = _CREDENTIAL_RE.search(self.headers.get("Authorization", ""))
            if match and match.group(1) not in R2_REGIONS:
                return (
                    400,
                    "InvalidRegionName",
                    (
                        f"The region name '{match.group(1)}' is not valid. Must be one of: "
                        "wnam, enam, weur, eeur, apac, oc, auto"
                    ),
                )
            content_sha = self.headers.get("x-amz-content-sha256", "")
            encoding = self.headers.get("Content-Encoding", "")
            if "aws-chunked" in encoding or content_sha.startswith("STREAMING-") or self.headers.get("x-amz-trailer"):
                return 401, "Unauthorized", "Unauthorized"
            query = self._query()
            for name, value in self.headers.items():
                lower = name.lower()
                if not lower.startswith(("x-amz-checksum-", "x-amz-sdk-checksum-")) or lower == "x-amz-checksum-mode":
                    continue
                single_put = self.command == "PUT" and "partNumber" not in query and "uploadId" not in query
                if single_put and lower in ALLOWED_PUT_CHECKSUMS:
                    continue
                return 501, "NotImplemented", f"Header '{lower}' with value '{value}' not implemented"
            return None

        def handle_expect_100(self) -> bool:
            # Refuse before the client sends the body, as a real server does on Expect: 100-continue.
            refusal = self._header_refusal()
            if refusal is not None:
                self._refuse(*refusal, body="unread")
                return False
            return super().handle_expect_100()

        # --- plumbing ---------------------------------------------------------------------------
        def _send(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None) -> None:
            self.send_response(status)
            for name, value in headers or []:
                self.send_header(name, value)
            if not (self.command == "HEAD" and any(name.lower() == "content-length" for name, _ in headers or [])):
                self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _refuse(self, status: int, code: str, message: str, *, body: str) -> None:
            """Answer with R2's error; ``body`` says what became of the request body: ``unread`` (refused
            on Expect: 100-continue, so the connection cannot be reused), ``drain`` or ``read``."""
            front.refuse(f"{status} {code} {self.command} {message}")
            if body == "unread":
                self.close_connection = True
            elif body == "drain":
                self._read_body()
            self._send(status, _error_xml(code, message), [("Content-Type", "application/xml")])

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks: list[bytes] = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _upstream(self) -> http.client.HTTPConnection:
            conn = getattr(upstream_local, "conn", None)
            if conn is None:
                conn = http.client.HTTPConnection(
                    front.upstream.hostname or "127.0.0.1", front.upstream.port, timeout=120
                )
                upstream_local.conn = conn
            return conn

        def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
            headers = {
                k: v
                for k, v in self.headers.items()
                if k.lower() not in {"connection", "expect", "transfer-encoding", "content-length"}
            }
            headers["Content-Length"] = str(len(body))
            for attempt in (1, 2):
                conn = self._upstream()
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    response = conn.getresponse()
                    data = response.read()
                    break
                except (http.client.HTTPException, OSError):
                    conn.close()  # a kept-alive connection moto closed: one fresh try
                    upstream_local.conn = None
                    if attempt == 2:
                        raise
            dropped = {"transfer-encoding", "connection", "server", "date"}
            if self.command != "HEAD":
                dropped.add("content-length")  # recomputed from the body; a HEAD keeps the object's
            passed = [(k, v) for k, v in response.getheaders() if k.lower() not in dropped]
            return response.status, passed, data

        # --- the operations R2 treats differently -----------------------------------------------
        def _route(self) -> None:
            refusal = self._header_refusal()
            if refusal is not None:
                self._refuse(*refusal, body="drain")
                return
            query = self._query()
            body = self._read_body()
            if self.command == "GET" and "uploads" in query:
                self._list_multipart_uploads(query)
                return
            if self.command == "PUT" and "uploadId" not in query:
                claimed = self.headers.get("x-amz-checksum-sha256")
                if claimed is not None and claimed != b64encode(hashlib.sha256(body).digest()).decode():
                    self._refuse(
                        400,
                        "BadDigest",
                        "The SHA-256 you specified did not match the calculated checksum.",
                        body="read",
                    )
                    return
                if claimed is not None:
                    with front._lock:
                        front.sha256_checked.append(urlparse(self.path).path)
            if self.command == "POST" and "uploadId" in query and body:
                refusal = self._complete_refusal(query["uploadId"][0], body)
                if refusal is not None:
                    self._refuse(*refusal, body="read")
                    return
            status, headers, data = self._forward(body)
            if self.command == "PUT" and "uploadId" in query and "partNumber" in query and status == 200:
                front.record_part(query["uploadId"][0], int(query["partNumber"][0]), len(body))
            if self.command in {"POST", "DELETE"} and "uploadId" in query and status in {200, 204}:
                front.forget(query["uploadId"][0])
            if status == 200 and (self.command == "PUT" or (self.command == "POST" and "uploadId" in query)):
                with front._lock:
                    front.writes[urlparse(self.path).path] += 1
            self._send(status, data, headers)

        def _complete_refusal(self, upload_id: str, body: bytes) -> tuple[int, str, str] | None:
            document = ET.fromstring(body)  # noqa: S314 - sent by the client under test
            numbers = [int(n.text or 0) for n in document.iter() if n.tag.endswith("PartNumber")]
            if len(numbers) > MAX_PARTS:
                return 400, "InvalidPart", f"An upload may have at most {MAX_PARTS} parts."
            sizes = front.part_sizes(upload_id)
            listed = [sizes[n] for n in numbers if n in sizes]
            if len(listed) > 1:
                body_sizes, last = listed[:-1], listed[-1]
                if len(set(body_sizes)) > 1 or last > body_sizes[0]:
                    return 400, "InvalidPart", "All non-trailing parts must have the same length."
            return None

        def _list_multipart_uploads(self, query: dict[str, list[str]]) -> None:
            status, headers, data = self._forward(b"")
            if status != 200:
                self._send(status, data, headers)
                return
            root = ET.fromstring(data)  # noqa: S314 - from our own moto
            uploads = [u for u in root if u.tag.endswith("Upload")]
            for upload in uploads:
                root.remove(upload)

            def field(element: ET.Element, name: str) -> str:
                found = element.find(f"{{{S3_NS}}}{name}")
                if found is None:
                    found = element.find(name)
                return (found.text or "") if found is not None else ""

            ordered = sorted(uploads, key=lambda u: field(u, "Key"))  # stable: initiation order within a key
            key_marker = query.get("key-marker", [""])[0]
            id_marker = query.get("upload-id-marker", [""])[0]
            if key_marker:
                position = 0
                for index, upload in enumerate(ordered):
                    key = field(upload, "Key")
                    same_key_done = key == key_marker and (not id_marker or field(upload, "UploadId") == id_marker)
                    if key < key_marker or same_key_done:
                        position = index + 1
                ordered = ordered[position:]
            limit = min(int(query.get("max-uploads", ["1000"])[0] or 1000), front.list_uploads_page)
            page, truncated = ordered[:limit], len(ordered) > limit
            ns = f"{{{S3_NS}}}" if root.tag.startswith("{") else ""
            for name, value in (
                ("MaxUploads", str(limit)),
                ("IsTruncated", "true" if truncated else "false"),
                ("KeyMarker", key_marker),
                ("UploadIdMarker", id_marker),
            ):
                element = root.find(f"{ns}{name}")
                if element is None:
                    element = ET.SubElement(root, f"{ns}{name}")
                element.text = value
            if truncated and page:
                ET.SubElement(root, f"{ns}NextKeyMarker").text = field(page[-1], "Key")
                ET.SubElement(root, f"{ns}NextUploadIdMarker").text = field(page[-1], "UploadId")
            root.extend(page)
            self._send(200, ET.tostring(root, xml_declaration=True, encoding="UTF-8"), headers)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _route  # noqa: N815 - http.server's naming

    return Handler
