"""The one module that talks to the object store (Cloudflare R2, or any S3-compatible store).

It is the only importer of boto3/botocore/s3transfer. Timeouts, retries, path-style addressing and
the multipart settings come from ``settings.R2_*``. Every botocore failure leaves this module as a
:class:`StorageError` subclass whose message says what is wrong and what to fix, so callers
(the upload service, ``r2_check``, the admin) can show it as is.
"""

from __future__ import annotations

import base64
import hashlib
import socket
import threading
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
    SSLError,
)
from django.conf import settings
from s3transfer.exceptions import CancelledError as S3CancelledError
from s3transfer.futures import TransferFuture
from s3transfer.subscribers import BaseSubscriber

SHA256_METADATA_KEY = "sha256"  # sent as x-amz-meta-sha256


class StorageError(Exception):
    """Something went wrong talking to the object store; ``str()`` is readable by staff."""


class StorageNotConfiguredError(StorageError):
    pass


class StorageUnreachableError(StorageError):
    pass


class StorageBadCredentialsError(StorageError):
    pass


class StorageAccessDeniedError(StorageError):
    pass


class StorageBucketMissingError(StorageError):
    pass


class StorageObjectMissingError(StorageError):
    pass


class StorageTransientError(StorageError):
    """Throttling, a 5xx or a timeout that survived botocore's own retries: worth retrying later."""


class TransferCancelledError(StorageError):
    pass


_BAD_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "Unauthorized",
    "InvalidClientTokenId",
    "AuthorizationHeaderMalformed",
}
_TRANSIENT_CODES = {
    "SlowDown",
    "RequestTimeout",
    "InternalError",
    "ServiceUnavailable",
    "Throttling",
    "RequestTimeTooSkewed",
    "TooManyRequests",
}


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    sha256: str | None = None  # from our metadata; None when listed (listings carry no metadata)


# --- request accounting -----------------------------------------------------------------------
class RequestLog:
    """Counts S3 operations sent by this process, per operation and per (operation, key).

    Tests and the benchmark use it to prove that a resumed upload sends no bytes for objects
    that are already in the bucket. Thread-safe: s3transfer calls from its worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.operations: Counter[str] = Counter()
        self.keys: Counter[tuple[str, str]] = Counter()

    def record(self, operation: str, key: str | None) -> None:
        with self._lock:
            self.operations[operation] += 1
            if key:
                self.keys[(operation, key)] += 1

    def reset(self) -> None:
        with self._lock:
            self.operations.clear()
            self.keys.clear()

    def keys_written(self) -> set[str]:
        """Keys that received object bytes (PutObject or UploadPart)."""
        with self._lock:
            return {key for (op, key) in self.keys if op in {"PutObject", "UploadPart"}}


request_log = RequestLog()


def _record_call(model: object, params: dict, **_: object) -> None:
    request_log.record(getattr(model, "name", "?"), params.get("Key"))


# --- client -----------------------------------------------------------------------------------
_clients: dict[tuple, object] = {}
_clients_lock = threading.Lock()


def _settings_key() -> tuple:
    return (
        settings.R2_ENDPOINT_URL,
        settings.R2_ACCESS_KEY_ID,
        settings.R2_SECRET_ACCESS_KEY,
        settings.R2_REGION,
        settings.R2_CONNECT_TIMEOUT_S,
        settings.R2_READ_TIMEOUT_S,
        settings.R2_MAX_ATTEMPTS,
        settings.R2_CHECKSUMS,
        settings.R2_MAX_CONCURRENCY,
        settings.R2_CA_BUNDLE,
    )


def check_configured() -> None:
    missing = [
        name
        for name in ("R2_ENDPOINT_URL", "R2_ACCESS_KEY_ID", "R2_SECRET_ACCESS_KEY", "R2_BUCKET")
        if not getattr(settings, name)
    ]
    if missing:
        raise StorageNotConfiguredError(
            f"Object storage is not configured: set {', '.join(missing)} in the environment (see docs/r2.md)."
        )


def client():  # -> botocore S3 client (untyped: botocore generates it at runtime)
    """A shared S3 client for the current settings (boto3 clients are thread-safe)."""
    check_configured()
    key = _settings_key()
    with _clients_lock:
        cached = _clients.get(key)
        if cached is None:
            config = Config(
                region_name=settings.R2_REGION,
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": settings.R2_MAX_ATTEMPTS},  # initial + retries
                connect_timeout=settings.R2_CONNECT_TIMEOUT_S,
                read_timeout=settings.R2_READ_TIMEOUT_S,
                # Room for every multipart worker plus a few control calls.
                max_pool_connections=settings.R2_MAX_CONCURRENCY + 4,
                # "when_required" (the default) for R2: botocore's "when_supported" sends bodies
                # aws-chunked with a CRC32 trailer over https, which R2 refuses (see settings.py).
                request_checksum_calculation=settings.R2_CHECKSUMS,
                response_checksum_validation=settings.R2_CHECKSUMS,
            )
            cached = boto3.session.Session().client(
                "s3",
                endpoint_url=settings.R2_ENDPOINT_URL,
                aws_access_key_id=settings.R2_ACCESS_KEY_ID,
                aws_secret_access_key=settings.R2_SECRET_ACCESS_KEY,
                config=config,
                verify=settings.R2_CA_BUNDLE or None,  # None: botocore's default store (AWS_CA_BUNDLE, certifi)
            )
            cached.meta.events.register("before-parameter-build.s3", _record_call)
            _clients[key] = cached
        return cached


def transfer_config() -> TransferConfig:
    return TransferConfig(
        multipart_threshold=multipart_threshold(),
        multipart_chunksize=settings.R2_MULTIPART_CHUNK_MB * 1024 * 1024,
        max_concurrency=settings.R2_MAX_CONCURRENCY,
        use_threads=True,
        preferred_transfer_client="classic",
    )


def multipart_threshold() -> int:
    return settings.R2_MULTIPART_THRESHOLD_MB * 1024 * 1024


def checksum_sha256(hex_digest: str) -> str:
    """S3's ``ChecksumSHA256`` form (base64 of the raw digest) of a hex sha256."""
    return base64.b64encode(bytes.fromhex(hex_digest)).decode()


def default_bucket() -> str:
    check_configured()
    return settings.R2_BUCKET


def uri(bucket: str, prefix: str) -> str:
    return f"s3://{bucket}/{prefix.strip('/')}"


def parse_uri(value: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``."""
    parsed = urlparse(value)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"{value!r} is not an s3://bucket/prefix URI.")
    return parsed.netloc, parsed.path.strip("/")


# --- errors -----------------------------------------------------------------------------------
def translate(exc: Exception, *, bucket: str = "", key: str = "") -> StorageError:
    """A readable domain error for a botocore/s3transfer failure."""
    endpoint = settings.R2_ENDPOINT_URL
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, S3CancelledError):
        return TransferCancelledError("The transfer was cancelled.")
    if isinstance(exc, SSLError):
        return StorageUnreachableError(
            f"The TLS certificate of {endpoint} is not trusted: {exc}. Real R2 needs nothing here; for a "
            "store behind a private CA set R2_CA_BUNDLE to its CA certificate (PEM)."
        )
    if isinstance(exc, EndpointConnectionError | ConnectTimeoutError):
        return StorageUnreachableError(
            f"Cannot reach the storage endpoint {endpoint}: {exc}. Check R2_ENDPOINT_URL "
            "(https://<account>.r2.cloudflarestorage.com) and that this machine can reach it."
        )
    if isinstance(exc, ReadTimeoutError | ConnectionClosedError):
        return StorageTransientError(f"The storage endpoint {endpoint} stopped answering: {exc}.")
    if isinstance(exc, NoCredentialsError):
        return StorageNotConfiguredError("No storage credentials: set R2_ACCESS_KEY_ID and R2_SECRET_ACCESS_KEY.")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message", "") or code
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        where = f"s3://{bucket}/{key}" if key else f"bucket '{bucket}'"
        if code == "InvalidRegionName":
            return StorageError(
                f"The storage refused the signing region ({message}). Set R2_REGION=auto for Cloudflare R2."
            )
        if code == "BadDigest":
            return StorageError(f"The storage received other bytes than were hashed for {where} ({message}).")
        if code in _BAD_CREDENTIAL_CODES:
            hint = ""
            if code == "Unauthorized" and settings.R2_CHECKSUMS == "when_supported":
                # R2 answers Unauthorized to botocore's aws-chunked bodies with a checksum trailer.
                hint = " If the credentials are right, set R2_CHECKSUMS=when_required: R2 refuses checksum trailers."
            return StorageBadCredentialsError(
                f"The storage rejected the credentials ({code}: {message}). Check R2_ACCESS_KEY_ID and "
                "R2_SECRET_ACCESS_KEY: create an R2 API token with Object Read & Write in the Cloudflare dashboard."
                + hint
            )
        if code == "NoSuchBucket" or (status == 404 and not key):
            return StorageBucketMissingError(
                f"Bucket '{bucket}' does not exist at {endpoint}. Create it in the Cloudflare dashboard "
                "(R2 > Create bucket) or run `python manage.py r2_check --create-bucket`, and check R2_BUCKET."
            )
        if code in {"NoSuchKey", "404", "NotFound"} or status == 404:
            return StorageObjectMissingError(f"{where} does not exist.")
        if code in {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"} or status == 403:
            return StorageAccessDeniedError(
                f"Access denied to {where} ({code}). The API token needs Object Read & Write on bucket "
                f"'{bucket}' (or the credentials are wrong: check R2_ACCESS_KEY_ID / R2_SECRET_ACCESS_KEY)."
            )
        if code == "NotImplemented":
            # Not transient: R2 answers 501 to checksum headers it does not implement.
            return StorageError(
                f"The storage does not implement what was sent for {where} ({message}). For Cloudflare R2 keep "
                "R2_CHECKSUMS=when_required."
            )
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            return StorageTransientError(f"The storage is temporarily failing on {where}: {code} {message}.")
        return StorageError(f"Storage error on {where}: {code} {message}.")
    if isinstance(exc, BotoCoreError):
        return StorageError(f"Storage client error: {exc}.")
    return StorageError(f"{type(exc).__name__}: {exc}")


class _Translate:
    """``with _Translate(bucket, key):`` re-raises botocore errors as StorageError."""

    def __init__(self, bucket: str = "", key: str = "") -> None:
        self.bucket, self.key = bucket, key

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, exc, tb) -> Literal[False]:  # never swallows: mypy then sees the with-body's returns
        if exc is not None and isinstance(exc, ClientError | BotoCoreError | S3CancelledError):
            raise translate(exc, bucket=self.bucket, key=self.key) from exc
        return False


# --- operations -------------------------------------------------------------------------------
def probe_endpoint(timeout: float | None = None) -> None:
    """Open (and close) a TCP connection to the endpoint: separates network trouble from S3 trouble."""
    check_configured()
    parsed = urlparse(settings.R2_ENDPOINT_URL)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=timeout or settings.R2_CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        raise StorageUnreachableError(
            f"Cannot connect to {parsed.hostname}:{port} ({exc}). Check R2_ENDPOINT_URL and the network/firewall."
        ) from exc


def check_bucket(bucket: str) -> None:
    """Raise unless the bucket exists and the credentials may list it (one cheap request)."""
    with _Translate(bucket):
        client().list_objects_v2(Bucket=bucket, MaxKeys=1)


def create_bucket(bucket: str) -> None:
    with _Translate(bucket):
        try:
            client().create_bucket(Bucket=bucket)
        except ClientError as exc:
            # R2 takes no location constraint; some S3 clones insist on one matching the region.
            if exc.response.get("Error", {}).get("Code") != "IllegalLocationConstraintException":
                raise
            client().create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": settings.R2_REGION})


def head(bucket: str, key: str) -> ObjectInfo | None:
    """The object's size and stored sha256, or None when it does not exist."""
    with _Translate(bucket, key):
        try:
            response = client().head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
                return None
            raise
    metadata = {k.lower(): v for k, v in response.get("Metadata", {}).items()}
    return ObjectInfo(key=key, size=int(response["ContentLength"]), sha256=metadata.get(SHA256_METADATA_KEY))


def put_bytes(
    bucket: str, key: str, data: bytes, *, content_type: str = "application/octet-stream", sha256: str | None = None
) -> None:
    """One PutObject. The store checks the body against our SHA-256 (``ChecksumSHA256``, which R2
    verifies on single PUTs); ``sha256`` given is also kept in the object's metadata for verify."""
    metadata = {SHA256_METADATA_KEY: sha256} if sha256 else {}
    digest = sha256 or hashlib.sha256(data).hexdigest()
    with _Translate(bucket, key):
        client().put_object(
            Bucket=bucket,
            Key=key,
            Body=data,
            ContentType=content_type,
            Metadata=metadata,
            ChecksumSHA256=checksum_sha256(digest),
        )


def get_bytes(bucket: str, key: str) -> bytes:
    with _Translate(bucket, key):
        return client().get_object(Bucket=bucket, Key=key)["Body"].read()


def iter_object(bucket: str, key: str, chunk_size: int = 1024 * 1024) -> Iterator[bytes]:
    """Stream an object in chunks (memory stays at one chunk whatever the object size)."""
    with _Translate(bucket, key):
        body = client().get_object(Bucket=bucket, Key=key)["Body"]
        try:
            yield from body.iter_chunks(chunk_size)
        finally:
            body.close()


def delete(bucket: str, key: str) -> None:
    with _Translate(bucket, key):
        client().delete_object(Bucket=bucket, Key=key)


def list_objects(bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
    with _Translate(bucket):
        paginator = client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectInfo(key=item["Key"], size=int(item["Size"]))


def abort_incomplete_uploads(bucket: str, prefix: str, *, keys: Collection[str]) -> int:
    """Abort the multipart uploads a killed worker left on ``keys`` (they cost storage until R2's
    7-day lifecycle rule); return how many.

    Only those exact keys: another model uploading under the same prefix keeps its uploads. Every
    page of the listing is read (R2, like S3, returns at most 1000 uploads per page).
    """
    wanted = set(keys)
    aborted = 0
    with _Translate(bucket):
        paginator = client().get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for upload in page.get("Uploads", []):
                if upload["Key"] in wanted:
                    client().abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
                    aborted += 1
    return aborted


class _Progress(BaseSubscriber):
    def __init__(self, on_bytes: Callable[[int], None]) -> None:
        self._on_bytes = on_bytes

    def on_progress(self, future: object, bytes_transferred: int, **_: object) -> None:
        # Negative after a part is retried: s3transfer rewinds what it had counted.
        self._on_bytes(bytes_transferred)


class Transfer:
    """One file being uploaded in the background (parallel multipart above the threshold)."""

    def __init__(self, future: TransferFuture, bucket: str, key: str) -> None:
        self._future, self.bucket, self.key = future, bucket, key

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        self._future.cancel()  # s3transfer stops queueing parts and aborts the multipart upload

    def result(self) -> None:
        with _Translate(self.bucket, self.key):
            self._future.result()


class Uploader:
    """A pool of transfer threads. Files are read from disk part by part, never held whole in memory.

    ``with Uploader() as up: t = up.submit(path, bucket, key, sha256=..., on_bytes=...)``
    """

    def __enter__(self) -> Uploader:
        self._manager = create_transfer_manager(client(), transfer_config())
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On error, cancel what is in flight so multipart uploads are aborted, not left behind.
        # (The manager's own __exit__ does that; its shutdown(cancel=True) is broken in s3transfer 0.19.)
        self._manager.__exit__(exc_type, exc, tb)

    def submit(
        self, path: Path, bucket: str, key: str, *, sha256: str, content_type: str, on_bytes: Callable[[int], None]
    ) -> Transfer:
        extra_args: dict[str, object] = {"Metadata": {SHA256_METADATA_KEY: sha256}, "ContentType": content_type}
        if path.stat().st_size < multipart_threshold():
            # A single PUT: R2 checks the body against our SHA-256. Not on multipart uploads, where
            # s3transfer would ask for a FULL_OBJECT SHA-256 checksum, which R2 does not implement.
            extra_args["ChecksumSHA256"] = checksum_sha256(sha256)
        future = self._manager.upload(str(path), bucket, key, extra_args=extra_args, subscribers=[_Progress(on_bytes)])
        return Transfer(future, bucket, key)
