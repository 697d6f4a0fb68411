"""Hourly usage rollups: built from raw records, re-runnable for any hour; and raw-record retention.

Writes only (the reads are apps.metering.summary). docs/metering.md explains every number.

- ``records_aggregate`` reads raw records of a time range in ONE query (one snapshot) and groups
  them by hour x tenant x key x model; it is the one definition of what a rollup row contains,
  used by the builder and by the summary's live (not yet rolled up) hours.
- ``rollups_build(hour=...)`` replaces one hour's rollup rows with a fresh aggregate, under a lock
  on the hour's bookkeeping row, so running it twice (or twice at once) gives the same rows.
- ``rollups_catch_up`` is the beat's pass: the last few complete hours, plus any older hour that
  received a record since the last pass (records written late, e.g. after the gateway's usage
  buffer waited out a database outage, carry their request time, so they land in their own hour).
- ``usage_records_prune`` deletes raw records older than USAGE_RETENTION_DAYS in small batches,
  only from hours that are rolled up and have no record newer than their build.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Exists, Max, Min, OuterRef
from django.db.models.functions import TruncHour
from django.utils import timezone

from apps.metering import histograms
from apps.metering.models import RollupCursor, UsageRecord, UsageRollup, UsageRollupHour

log = logging.getLogger(__name__)

HOUR = timedelta(hours=1)
CATCH_UP_CURSOR = "rollups"


def floor_hour(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def ceil_hour(moment: datetime) -> datetime:
    floored = floor_hour(moment)
    return floored if floored == moment else floored + HOUR


@dataclass
class Group:
    """The counts of one hour x tenant x key x model; the same fields as a UsageRollup row."""

    hour: datetime
    tenant_id: int
    api_key_prefix: str
    model_name: str
    api_key_id: int | None = None
    model_id: int | None = None
    requests: int = 0
    errors_4xx: int = 0
    errors_429: int = 0
    errors_5xx: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0
    estimated_tokens: int = 0
    cost_micros: int = 0
    ttft_hist: list[int] = field(default_factory=histograms.empty)
    latency_hist: list[int] = field(default_factory=histograms.empty)
    max_record_id: int = 0

    def add(
        self,
        *,
        status_code: int,
        prompt_tokens: int,
        completion_tokens: int,
        estimated: bool,
        cost_micros: int,
        ttft_ms: float | None,
        latency_ms: float | None,
    ) -> None:
        self.requests += 1
        if status_code == 429:
            self.errors_429 += 1
        elif status_code == 499:
            self.cancelled += 1
        elif 400 <= status_code < 500:
            self.errors_4xx += 1
        elif status_code >= 500:
            self.errors_5xx += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if estimated:
            self.estimated_requests += 1
            self.estimated_tokens += prompt_tokens + completion_tokens
        self.cost_micros += cost_micros
        histograms.observe(self.ttft_hist, ttft_ms)
        histograms.observe(self.latency_hist, latency_ms)

    def as_rollup(self, *, built_at: datetime) -> UsageRollup:
        values = {name: getattr(self, name) for name in _ROLLUP_FIELDS}
        return UsageRollup(**values, built_at=built_at)


_ROLLUP_FIELDS = [
    "hour",
    "tenant_id",
    "api_key_id",
    "api_key_prefix",
    "model_id",
    "model_name",
    "requests",
    "errors_4xx",
    "errors_429",
    "errors_5xx",
    "cancelled",
    "prompt_tokens",
    "completion_tokens",
    "estimated_requests",
    "estimated_tokens",
    "cost_micros",
    "ttft_hist",
    "latency_hist",
]


def records_aggregate(*, start: datetime, end: datetime, tenant_id: int | None = None) -> list[Group]:
    """Raw records with start <= created_at < end, grouped by UTC hour x tenant x key x model.

    Histograms need every value, so the grouping happens here while the rows stream past (one
    query, read in chunks), not in SQL; it is also the one place the status classes are decided.
    """
    queryset = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
    if tenant_id is not None:
        queryset = queryset.filter(tenant_id=tenant_id)
    rows = queryset.order_by().values_list(
        "id",
        "created_at",
        "tenant_id",
        "api_key_id",
        "api_key__prefix",
        "model_id",
        "model_name",
        "status_code",
        "prompt_tokens",
        "completion_tokens",
        "estimated",
        "cost_micros",
        "ttft_ms",
        "latency_ms",
    )
    groups: dict[tuple[datetime, int, str, str], Group] = {}
    for (
        record_id,
        created_at,
        tenant,
        key_id,
        key_prefix,
        model_id,
        model_name,
        status_code,
        prompt,
        completion,
        estimated,
        cost,
        ttft,
        latency,
    ) in rows.iterator(chunk_size=5000):
        hour = floor_hour(created_at)
        group_key = (hour, tenant, key_prefix or "", model_name)
        group = groups.get(group_key)
        if group is None:
            group = groups[group_key] = Group(
                hour=hour, tenant_id=tenant, api_key_prefix=key_prefix or "", model_name=model_name
            )
        # A model deleted and created again under the same name within the hour: keep the newest.
        group.api_key_id = key_id if key_id is not None else group.api_key_id
        group.model_id = max(filter(None, (group.model_id, model_id)), default=None)
        group.max_record_id = max(group.max_record_id, record_id)
        group.add(
            status_code=status_code,
            prompt_tokens=prompt,
            completion_tokens=completion,
            estimated=estimated,
            cost_micros=cost,
            ttft_ms=ttft,
            latency_ms=latency,
        )
    return list(groups.values())


@dataclass
class BuildResult:
    hour: datetime
    records: int
    groups: int


def rollups_build(*, hour: datetime, now: datetime | None = None) -> BuildResult:
    """Recompute one UTC hour from its raw records and replace its rollup rows.

    Idempotent: the same records give the same rows however often it runs. Two builds of the same
    hour at once queue on the hour's bookkeeping row. An hour that has not ended yet is refused:
    its rows would be incomplete, and the summary reads such hours from raw records instead.
    """
    hour = floor_hour(hour)
    now = now or timezone.now()
    if hour + HOUR > now:
        raise ValueError(f"the hour {hour:%Y-%m-%d %H}:00 UTC has not ended yet")
    with transaction.atomic():
        UsageRollupHour.objects.get_or_create(hour=hour)
        book = UsageRollupHour.objects.select_for_update().get(hour=hour)
        if book.pruned_at is not None:
            # Its raw records are gone: rebuilding would replace the rollups with nothing.
            return BuildResult(hour=hour, records=book.records, groups=-1)
        groups = records_aggregate(start=hour, end=hour + HOUR)
        built_at = timezone.now()
        UsageRollup.objects.filter(hour=hour).delete()
        UsageRollup.objects.bulk_create([group.as_rollup(built_at=built_at) for group in groups], batch_size=500)
        book.built_at = built_at
        book.records = sum(group.requests for group in groups)
        book.max_record_id = max((group.max_record_id for group in groups), default=0)
        book.save(update_fields=["built_at", "records", "max_record_id"])
    return BuildResult(hour=hour, records=book.records, groups=len(groups))


def rollups_build_range(*, start: datetime, end: datetime, now: datetime | None = None) -> list[BuildResult]:
    """Every complete hour in [floor(start), ceil(end)), oldest first."""
    now = now or timezone.now()
    hour, stop = floor_hour(start), min(ceil_hour(end), floor_hour(now))
    results = []
    while hour < stop:
        results.append(rollups_build(hour=hour, now=now))
        hour += HOUR
    return results


def rollups_catch_up(*, now: datetime | None = None) -> list[BuildResult]:
    """The beat's pass: rebuild the last USAGE_ROLLUP_LOOKBACK_HOURS complete hours and every
    older hour that received records since the previous pass.

    Late records are found by id: ids grow with insertion, so the records inserted since the last
    pass are those above the cursor, whatever their created_at. A record whose transaction was
    still open at the previous pass may have an id below the cursor; it is a record of the last
    seconds, and the lookback hours cover it. The hours since the previous pass are rebuilt too
    (``covered_before``), so a beat that was down longer than the lookback leaves no hole.
    """
    now = now or timezone.now()
    current = floor_hour(now)
    cursor, _ = RollupCursor.objects.get_or_create(name=CATCH_UP_CURSOR)
    newest_id = UsageRecord.objects.aggregate(newest=Max("id"))["newest"] or 0
    hours = {current - HOUR * back for back in range(1, settings.USAGE_ROLLUP_LOOKBACK_HOURS + 1)}
    if cursor.covered_before is not None:
        # Every hour since the last pass, however long beat was away: the records of the hour that
        # was current then have ids below the cursor, so the id scan below does not find them.
        hour = floor_hour(cursor.covered_before)
        while hour < current:
            hours.add(hour)
            hour += HOUR
    elif cursor.last_record_id:
        # The first pass since covered_before exists: passes before it could leave such an hour
        # unbuilt. Find any once (one scan), so what covered_before promises holds from now on.
        unbuilt = (
            UsageRecord.objects.filter(id__lte=cursor.last_record_id, created_at__lt=current)
            .annotate(record_hour=TruncHour("created_at", tzinfo=UTC))
            .filter(~Exists(UsageRollupHour.objects.filter(hour=OuterRef("record_hour"), built_at__isnull=False)))
            .order_by()
            .values_list("record_hour", flat=True)
            .distinct()
        )
        hours.update(floor_hour(moment) for moment in unbuilt)
    if newest_id > cursor.last_record_id:
        # The distinct hours in SQL: on the first pass (cursor 0) this is every hour with records,
        # which is how existing usage gets its rollups after an upgrade.
        late = (
            UsageRecord.objects.filter(
                id__gt=cursor.last_record_id, id__lte=newest_id, created_at__lt=min(hours, default=current)
            )
            .annotate(record_hour=TruncHour("created_at", tzinfo=UTC))
            .order_by()
            .values_list("record_hour", flat=True)
            .distinct()
        )
        hours.update(floor_hour(moment) for moment in late)
    results = [rollups_build(hour=hour, now=now) for hour in sorted(hours) if hour < current]
    # Now every record with id <= newest_id and a time before the current hour is in a built rollup.
    RollupCursor.objects.filter(name=CATCH_UP_CURSOR).update(last_record_id=newest_id, covered_before=current)
    return results


@dataclass
class PruneResult:
    deleted: int = 0
    hours: list[datetime] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def usage_records_prune(*, now: datetime | None = None, max_rows: int | None = None) -> PruneResult:
    """Delete raw records older than USAGE_RETENTION_DAYS, oldest hour first, in batches of
    USAGE_PRUNE_BATCH ids, at most ``max_rows`` (USAGE_PRUNE_MAX_ROWS) per call.

    Each batch is its own short statement over a few thousand ids, so no lock is held for long.
    An hour is pruned only once it is rolled up and no record of it has arrived since its build
    (a record with an id above what the build read): such an hour is rebuilt first. The hour is
    marked pruned before its first delete, so no rebuild can run over half-deleted records.
    """
    now = now or timezone.now()
    cutoff = floor_hour(now - timedelta(days=settings.USAGE_RETENTION_DAYS))
    budget = max_rows if max_rows is not None else settings.USAGE_PRUNE_MAX_ROWS
    result = PruneResult()
    while budget > 0:
        oldest = UsageRecord.objects.filter(created_at__lt=cutoff).aggregate(oldest=Min("created_at"))["oldest"]
        if oldest is None:
            break
        hour = floor_hour(oldest)
        in_hour = UsageRecord.objects.filter(created_at__gte=hour, created_at__lt=hour + HOUR)
        book = UsageRollupHour.objects.filter(hour=hour, built_at__isnull=False).first()
        if book is None or (book.pruned_at is None and in_hour.filter(id__gt=book.max_record_id).exists()):
            rollups_build(hour=hour, now=now)  # not rolled up yet, or records arrived after its build
            book = UsageRollupHour.objects.get(hour=hour)
        if book.pruned_at is None:
            UsageRollupHour.objects.filter(pk=book.pk).update(pruned_at=now)
        while budget > 0:
            ids = list(
                in_hour.filter(id__lte=book.max_record_id)
                .order_by("id")
                .values_list("id", flat=True)[: min(budget, settings.USAGE_PRUNE_BATCH)]
            )
            if not ids:
                break
            deleted, _ = UsageRecord.objects.filter(id__in=ids).delete()
            result.deleted += deleted
            budget -= max(deleted, 1)
        if in_hour.exists():
            if budget > 0:  # only records newer than its rollup are left: never delete those unrolled
                result.skipped.append(f"{hour:%Y-%m-%d %H}:00 UTC has records newer than its rollup")
                log.warning("usage retention: %s; not pruned", result.skipped[-1])
            break
        result.hours.append(hour)
    if result.deleted:
        log.info("usage retention: deleted %d raw records from %d hour(s)", result.deleted, len(result.hours))
    return result
