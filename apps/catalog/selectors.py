"""Non-trivial reads for the catalog: models with their latest upload and verification, and the
storage browser (what model folders the bucket holds)."""

from __future__ import annotations

from dataclasses import dataclass, field
from posixpath import dirname

from django.db.models import Count, OuterRef, Prefetch, Q, QuerySet, Subquery, Value
from django.db.models.functions import Coalesce

from apps.catalog import storage
from apps.catalog.models import ServedModel, UploadStatus, VerifyStatus, WeightUpload, WeightVerification
from apps.catalog.transfer import MANIFEST_NAME
from apps.catalog.verify import load_manifest

# A folder holding one of these is a model root (as the Run:ai streamer and vLLM see it).
_ROOT_MARKERS = (MANIFEST_NAME, "config.json")


@dataclass
class StoredModel:
    prefix: str
    uri: str
    total_bytes: int = 0
    file_count: int = 0
    manifest_state: str = "missing"  # present | missing | mismatch | absent (catalog points to nothing)
    manifest_problems: list[str] = field(default_factory=list)
    models: list[ServedModel] = field(default_factory=list)


def with_latest_jobs(queryset: QuerySet[ServedModel]) -> QuerySet[ServedModel]:
    """``queryset`` annotated with ``upload_status`` and ``verify_status`` (of the latest attempt:
    "none" / "" when there is none; filterable and sortable) and with the latest attempt rows
    prefetched for ``ServedModel.latest_upload`` / ``latest_verification``: two extra queries for a list."""
    latest_upload = WeightUpload.objects.filter(model=OuterRef("pk")).order_by("-id")
    latest_check = WeightVerification.objects.filter(model=OuterRef("pk")).order_by("-id")
    # django-stubs takes ServedModel's declarations of the to_attr names (annotations only, nothing
    # at runtime for the prefetch to clash with) for attributes that the prefetch would overwrite.
    return queryset.annotate(  # type: ignore[no-redef]
        upload_status=Coalesce(Subquery(latest_upload.values("status")[:1]), Value(UploadStatus.NONE.value)),
        verify_status=Coalesce(Subquery(latest_check.values("status")[:1]), Value(VerifyStatus.NEVER.value)),
    ).prefetch_related(
        Prefetch(
            "uploads",
            to_attr="latest_uploads",
            queryset=WeightUpload.objects.filter(
                id=Subquery(WeightUpload.objects.filter(model=OuterRef("model")).order_by("-id").values("id")[:1])
            ),
        ),
        Prefetch(
            "verifications",
            to_attr="latest_verifications",
            queryset=WeightVerification.objects.filter(
                id=Subquery(WeightVerification.objects.filter(model=OuterRef("model")).order_by("-id").values("id")[:1])
            ),
        ),
    )


def models_with_counts() -> QuerySet[ServedModel]:
    """Models with node counts (ready, live, all) and their latest jobs: a few queries for the changelist."""
    from apps.fleet.models import LIVE_STATUSES, NodeStatus

    # ``scale``: the autoscaler's row (apps.fleet.models.ModelScale): desired replicas and why.
    return with_latest_jobs(ServedModel.objects.select_related("scale")).annotate(
        live_nodes=Count("nodes", filter=Q(nodes__status__in=list(LIVE_STATUSES)), distinct=True),
        ready_nodes=Count("nodes", filter=Q(nodes__status=NodeStatus.READY), distinct=True),
        total_nodes=Count("nodes", distinct=True),
    )


def _roots(keys: list[str]) -> list[str]:
    roots = {dirname(k) for k in keys if k.rsplit("/", 1)[-1] in _ROOT_MARKERS}
    roots |= {dirname(k) for k in keys if k.endswith(".safetensors") and not any(k.startswith(r + "/") for r in roots)}
    # A config.json inside a model's own subfolder (e.g. original/) is not a second model.
    return sorted(r for r in roots if not any(r != o and r.startswith(o + "/") for o in roots))


def _manifest_state(listed: dict[str, int], manifest: list[dict] | None) -> tuple[str, list[str]]:
    if manifest is None:
        return "missing", []
    if not manifest:
        return "mismatch", ["manifest unreadable or empty"]
    problems = []
    for entry in manifest:
        size = listed.get(entry["path"])
        if size is None:
            problems.append(f"{entry['path']}: missing")
        elif size != entry["size"]:
            problems.append(f"{entry['path']}: size {size} != manifest {entry['size']}")
    return ("mismatch" if problems else "present"), problems


def storage_browser(*, bucket: str | None = None) -> list[StoredModel]:
    """Every model folder in the bucket with its size, file count and manifest state, and the
    catalog Models pointing at it; plus catalog Models whose URI points at nothing.

    One listing of the bucket plus one GET per manifest. Sizes are checked against the manifest
    here; checksums are the job of verify.
    """
    bucket = bucket or storage.default_bucket()
    objects = list(storage.list_objects(bucket))
    roots = _roots([o.key for o in objects])
    rows = {root: StoredModel(prefix=root, uri=storage.uri(bucket, root)) for root in roots}
    per_root: dict[str, dict[str, int]] = {root: {} for root in roots}
    for obj in objects:
        root = next((r for r in sorted(roots, key=len, reverse=True) if obj.key.startswith(r + "/")), None)
        if root is None or obj.key == f"{root}/{MANIFEST_NAME}":
            continue
        per_root[root][obj.key[len(root) + 1 :]] = obj.size
    for root, row in rows.items():
        listed = per_root[root]
        row.total_bytes, row.file_count = sum(listed.values()), len(listed)
        row.manifest_state, row.manifest_problems = _manifest_state(listed, load_manifest(bucket, root))
    for model in with_latest_jobs(ServedModel.objects.exclude(storage_uri="")).order_by("name"):
        try:
            model_bucket, prefix = storage.parse_uri(model.storage_uri)
        except ValueError:
            continue
        if model_bucket != bucket:
            continue
        if prefix not in rows:
            rows[prefix] = StoredModel(prefix=prefix, uri=storage.uri(bucket, prefix), manifest_state="absent")
        rows[prefix].models.append(model)
    return sorted(rows.values(), key=lambda r: r.prefix)
