"""Check the object store end to end: settings, network, credentials, bucket, write/read/delete."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.catalog import storage


class Command(BaseCommand):
    help = "Check R2 (or any S3-compatible store) settings, reachability, credentials, bucket and a write probe."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--create-bucket", action="store_true", help="Create R2_BUCKET if it does not exist.")

    def _line(self, ok: bool | None, check: str, detail: str) -> None:
        word = {True: self.style.SUCCESS("OK  "), False: self.style.ERROR("FAIL"), None: self.style.WARNING("SKIP")}
        self.stdout.write(f"{word[ok]} {check:<12} {detail}")

    def handle(self, *args: Any, **opts: Any) -> None:
        failures = self._run(create=opts["create_bucket"])
        if failures:
            raise CommandError(f"{failures} check(s) failed: fix the FAIL lines above and run r2_check again.")
        self.stdout.write(self.style.SUCCESS("Storage is ready for model uploads."))

    def _run(self, *, create: bool) -> int:
        checks = ["endpoint", "credentials", "bucket", "write probe"]
        try:
            storage.check_configured()
        except storage.StorageError as exc:
            self._line(False, "settings", str(exc))
            for check in checks:
                self._line(None, check, "needs the settings above")
            return 1
        key_hint = settings.R2_ACCESS_KEY_ID[:4] + "…"
        bucket = settings.R2_BUCKET
        self._line(True, "settings", f"endpoint {settings.R2_ENDPOINT_URL}, bucket '{bucket}', key {key_hint}")

        try:
            storage.probe_endpoint()
        except storage.StorageError as exc:
            self._line(False, "endpoint", str(exc))
            for check in checks[1:]:
                self._line(None, check, "needs a reachable endpoint")
            return 1
        self._line(True, "endpoint", f"{settings.R2_ENDPOINT_URL} accepts connections")

        bucket_missing = False
        try:
            storage.check_bucket(bucket)
        except storage.StorageBucketMissingError:
            bucket_missing = True  # the store authenticated us before saying the bucket is missing
        except storage.StorageBadCredentialsError as exc:
            self._line(False, "credentials", str(exc))
            self._line(None, "bucket", "needs valid credentials")
            self._line(None, "write probe", "needs valid credentials")
            return 1
        except storage.StorageError as exc:
            self._line(False, "credentials", str(exc))
            self._line(None, "bucket", "needs credentials allowed on the bucket")
            self._line(None, "write probe", "needs credentials allowed on the bucket")
            return 1
        self._line(True, "credentials", "accepted by the store")

        if bucket_missing:
            if not create:
                self._line(
                    False,
                    "bucket",
                    f"'{bucket}' does not exist: create it in the Cloudflare dashboard "
                    "(R2 > Create bucket), or rerun with --create-bucket.",
                )
                self._line(None, "write probe", "needs the bucket")
                return 1
            try:
                storage.create_bucket(bucket)
            except storage.StorageError as exc:
                self._line(
                    False,
                    "bucket",
                    f"'{bucket}' does not exist and could not be created: {exc} "
                    "(R2 bucket creation needs an Admin Read & Write token).",
                )
                self._line(None, "write probe", "needs the bucket")
                return 1
            self._line(True, "bucket", f"'{bucket}' created")
        else:
            self._line(True, "bucket", f"'{bucket}' exists and can be listed")

        probe_key = f"crosslogic-r2-check/{uuid.uuid4().hex}"
        payload = uuid.uuid4().bytes * 64
        try:
            storage.put_bytes(bucket, probe_key, payload, content_type="application/octet-stream")
            if storage.get_bytes(bucket, probe_key) != payload:
                raise storage.StorageError(f"read back different bytes from s3://{bucket}/{probe_key}")
            storage.delete(bucket, probe_key)
            if storage.head(bucket, probe_key) is not None:
                raise storage.StorageError(f"s3://{bucket}/{probe_key} still exists after delete")
        except storage.StorageError as exc:
            self._line(False, "write probe", f"{exc} (uploads need Object Read & Write on '{bucket}').")
            return 1
        self._line(True, "write probe", f"wrote, read back and deleted s3://{bucket}/{probe_key}")
        return 0
