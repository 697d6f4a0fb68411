"""Verify what sits in the bucket against a model's manifest.

Two depths:
- quick (default): one HEAD per file; compares the object's size and the sha256 stored in its
  metadata at upload time with the manifest. Catches missing, truncated and replaced objects
  (a replacement written by anything but our uploader carries no or another sha256).
- full: also streams every object and recomputes its sha256, so it catches bytes changed behind
  our back even when size and metadata were preserved. It reads the whole model from the bucket
  (free egress on R2, but it takes as long as a download).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from django.contrib.auth.models import User
from django.utils import timezone

from apps.catalog import storage
from apps.catalog.models import JobOrigin, ServedModel, VerifyStatus, WeightVerification
from apps.catalog.transfer import MANIFEST_NAME


@dataclass
class VerifyReport:
    uri: str
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    full: bool = False

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        depth = "full re-hash" if self.full else "size + stored checksum"
        if self.ok:
            return f"{self.uri}: {self.checked} file(s) match the manifest ({depth})."
        more = len(self.problems) - 5
        shown = "; ".join(self.problems[:5]) + (f"; and {more} more" if more > 0 else "")
        return f"{self.uri}: {len(self.problems)} problem(s) ({depth}): {shown}"


def load_manifest(bucket: str, prefix: str) -> list[dict] | None:
    """The manifest object's file list, or None when there is none."""
    key = f"{prefix.strip('/')}/{MANIFEST_NAME}"
    if storage.head(bucket, key) is None:
        return None
    try:
        document = json.loads(storage.get_bytes(bucket, key))
        return [{"path": str(f["path"]), "size": int(f["size"]), "sha256": str(f["sha256"])} for f in document["files"]]
    except (ValueError, KeyError, TypeError):
        return []


def verify_prefix(*, bucket: str, prefix: str, manifest: list[dict], full: bool = False) -> VerifyReport:
    report = VerifyReport(uri=storage.uri(bucket, prefix), full=full)
    if not manifest:
        report.problems.append("no manifest to verify against")
        return report
    for entry in manifest:
        key = f"{prefix.strip('/')}/{entry['path']}"
        report.checked += 1
        info = storage.head(bucket, key)
        if info is None:
            report.problems.append(f"{entry['path']}: missing")
            continue
        if info.size != entry["size"]:
            report.problems.append(f"{entry['path']}: size {info.size} != manifest {entry['size']}")
            continue
        if info.sha256 != entry["sha256"]:
            report.problems.append(f"{entry['path']}: stored sha256 {info.sha256 or 'absent'} != manifest")
            continue
        if full:
            digest = hashlib.sha256()
            for chunk in storage.iter_object(bucket, key):
                digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                report.problems.append(f"{entry['path']}: content sha256 {digest.hexdigest()[:12]}… != manifest")
    return report


def verify_model(
    *,
    model: ServedModel,
    full: bool = False,
    origin: str = JobOrigin.ADMIN,
    requested_by: User | None = None,
) -> VerifyReport:
    """Verify ``model``'s objects against its manifest (the row's, else the bucket's); the check is
    a WeightVerification row, running until it is finished here (ok, mismatch, or error on a
    storage failure, which is raised again)."""
    if not model.storage_uri:
        raise storage.StorageError(f"{model.name} has no storage URI: upload its weights first.")
    bucket, prefix = storage.parse_uri(model.storage_uri)
    check = WeightVerification.objects.create(
        model=model, full=full, uri=model.storage_uri, origin=origin, requested_by=requested_by
    )
    running = WeightVerification.objects.filter(pk=check.pk, status=VerifyStatus.RUNNING)
    try:
        manifest = model.manifest or load_manifest(bucket, prefix) or []
        report = verify_prefix(bucket=bucket, prefix=prefix, manifest=manifest, full=full)
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, storage.StorageError) else f"Unexpected error: {type(exc).__name__}: {exc}"
        running.update(status=VerifyStatus.ERROR, error=reason[:4000], finished_at=timezone.now())
        raise
    running.update(
        status=VerifyStatus.OK if report.ok else VerifyStatus.MISMATCH,
        checked=report.checked,
        problems=report.problems[:200],
        finished_at=timezone.now(),
    )
    return report
