from __future__ import annotations

from django.core.validators import RegexValidator
from django.db import models
from django.utils import timezone

from apps.metering import histograms


class UsageRecord(models.Model):
    """One row per gateway request, from vLLM's own usage numbers where it gave them."""

    request_id = models.CharField(max_length=64, unique=True)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.PROTECT, related_name="usage_records")
    api_key = models.ForeignKey(
        "tenancy.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    model = models.ForeignKey(
        "catalog.ServedModel", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    model_name = models.CharField(max_length=128, help_text="As requested, kept if the model is deleted.")
    node = models.ForeignKey(
        "fleet.Node", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_records"
    )
    endpoint = models.CharField(max_length=32, default="chat.completions")
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    estimated = models.BooleanField(default=False, help_text="Usage counted by the gateway, not reported by vLLM.")
    streamed = models.BooleanField(default=False)
    status_code = models.PositiveSmallIntegerField()
    ttft_ms = models.FloatField(null=True, blank=True)
    latency_ms = models.FloatField(null=True, blank=True)
    cost_micros = models.BigIntegerField(default=0, help_text="Cost in millionths of a US dollar.")
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at"]
        indexes = [
            models.Index(fields=["tenant", "-created_at"]),
            models.Index(fields=["api_key", "-created_at"]),
            models.Index(fields=["model", "-created_at"]),
            models.Index(fields=["node", "-created_at"]),
            models.Index(fields=["-created_at"]),
        ]

    def __str__(self) -> str:
        return self.request_id

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _empty_histogram() -> list[int]:
    return histograms.empty()


class UsageRollup(models.Model):
    """One hour of one tenant's usage through one key on one model (docs/metering.md).

    Rebuilt from the raw records by ``apps.metering.rollups.rollups_build``; never edited by hand.
    The grouping is on ``api_key_prefix`` and ``model_name`` (never null: "" when the key is gone)
    rather than the nullable foreign keys, so the unique constraint holds on every database (a
    NULL never equals another NULL in a unique index) and deleting a key cannot make two rows
    collide. The foreign keys are there for joins and admin links.

    Status classes (from the record's HTTP status): ``errors_4xx`` = 400-499 except 429 and 499;
    ``errors_429`` = rate-limited or over quota; ``errors_5xx`` = 500-599; ``cancelled`` = 499
    (the client closed the request: not an error of ours, but it may have used tokens).
    ``requests`` counts all of them, successes included.
    """

    hour = models.DateTimeField(help_text="Start of the UTC hour.")
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.PROTECT, related_name="usage_rollups")
    api_key = models.ForeignKey(
        "tenancy.ApiKey", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_rollups"
    )
    api_key_prefix = models.CharField(max_length=16, blank=True, default="", help_text="'' when the key is gone.")
    model = models.ForeignKey(
        "catalog.ServedModel", on_delete=models.SET_NULL, null=True, blank=True, related_name="usage_rollups"
    )
    model_name = models.CharField(max_length=128)
    requests = models.PositiveBigIntegerField(default=0)
    errors_4xx = models.PositiveBigIntegerField(default=0)
    errors_429 = models.PositiveBigIntegerField(default=0)
    errors_5xx = models.PositiveBigIntegerField(default=0)
    cancelled = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)
    estimated_requests = models.PositiveBigIntegerField(
        default=0, help_text="Requests whose tokens the gateway counted because vLLM did not report them."
    )
    estimated_tokens = models.PositiveBigIntegerField(default=0, help_text="Prompt + completion tokens of those.")
    cost_micros = models.BigIntegerField(default=0, help_text="Millionths of a US dollar.")
    # Counts over apps.metering.histograms.BOUNDS_MS (JSON arrays: the same on PostgreSQL and SQLite).
    ttft_hist = models.JSONField(default=_empty_histogram)
    latency_hist = models.JSONField(default=_empty_histogram)
    built_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-hour"]
        constraints = [
            models.UniqueConstraint(
                fields=["hour", "tenant", "api_key_prefix", "model_name"], name="metering_rollup_unique_group"
            ),
        ]
        indexes = [
            models.Index(fields=["hour"]),
            models.Index(fields=["tenant", "hour"]),
            models.Index(fields=["model", "hour"]),
        ]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00 {self.tenant_id}/{self.api_key_prefix or '-'}/{self.model_name}"


class UsageRollupHour(models.Model):
    """The bookkeeping of one rolled-up hour: when it was built from how many records.

    Its row is also the lock two concurrent rebuilds of the same hour take (select_for_update),
    and the proof retention asks for before it deletes an hour's raw records.
    """

    hour = models.DateTimeField(unique=True, help_text="Start of the UTC hour.")
    built_at = models.DateTimeField(null=True, blank=True)
    records = models.PositiveBigIntegerField(default=0, help_text="Raw records the last build read.")
    max_record_id = models.BigIntegerField(default=0, help_text="Highest raw record id the last build read.")
    pruned_at = models.DateTimeField(null=True, blank=True, help_text="When its raw records were deleted.")

    class Meta:
        ordering = ["-hour"]

    def __str__(self) -> str:
        return f"{self.hour:%Y-%m-%d %H}:00"


class RollupCursor(models.Model):
    """How far the rollup job has looked for late records (records are scanned by id, see
    apps.metering.rollups.rollups_catch_up), and what that proves: every record with an id up to
    ``last_record_id`` and a time before ``covered_before`` is in a built rollup. Readers that
    mix rollups with raw records (month spend, apps.metering.spend) rely on it."""

    name = models.CharField(max_length=32, unique=True)
    last_record_id = models.BigIntegerField(default=0)
    covered_before = models.DateTimeField(
        null=True, blank=True, help_text="The current hour when the last pass ended; empty: no pass yet."
    )
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"{self.name}: {self.last_record_id}"


class StripeCustomer(models.Model):
    """Which Stripe customer a tenant's usage is billed to (kept here, not on Tenant: billing is
    metering's concern and a tenant without one is simply not sent to Stripe)."""

    tenant = models.OneToOneField("tenancy.Tenant", on_delete=models.CASCADE, related_name="stripe_customer")
    customer_id = models.CharField(
        "Stripe customer id",
        max_length=255,
        unique=True,
        validators=[RegexValidator(r"^cus_[A-Za-z0-9]+$", "A Stripe customer id looks like cus_NffrFeUfNV2Hib.")],
    )
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    class Meta:
        ordering = ["tenant__slug"]

    def __str__(self) -> str:
        return f"{self.tenant} -> {self.customer_id}"


class MeterEventStatus(models.TextChoices):
    PENDING = "pending", "Pending"
    SENT = "sent", "Sent"
    FAILED = "failed", "Failed (will be resent)"


class StripeMeterEvent(models.Model):
    """One Billing Meter event for one tenant-hour-meter: frozen (value, identifier) before it is
    sent, so a resend after a failure or a crash repeats exactly the same request and Stripe's
    identifier and Idempotency-Key deduplicate it. Records that reach a sent hour later add a
    revision carrying the difference."""

    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.PROTECT, related_name="stripe_meter_events")
    hour = models.DateTimeField(help_text="Start of the UTC hour of usage (the event's timestamp).")
    meter = models.CharField(max_length=32, help_text="prompt_tokens, completion_tokens or cost_micros.")
    revision = models.PositiveIntegerField(default=0)
    event_name = models.CharField(max_length=100)
    customer_id = models.CharField(max_length=255)
    value = models.BigIntegerField()
    identifier = models.CharField(max_length=100, unique=True)
    status = models.CharField(max_length=16, choices=MeterEventStatus.choices, default=MeterEventStatus.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.CharField(max_length=500, blank=True)
    next_attempt_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    sent_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-hour", "tenant_id", "meter", "revision"]
        constraints = [
            models.UniqueConstraint(fields=["tenant", "hour", "meter", "revision"], name="metering_meter_event_unique"),
        ]
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return self.identifier


class BudgetAlertLevel(models.TextChoices):
    SOFT = "soft", "Soft threshold crossed"
    HARD = "hard", "Spend limit reached"


class BudgetAlert(models.Model):
    """A dollar budget crossed its soft threshold or its limit: at most one row per owner, month
    and level (the unique constraint is what makes the alert once a month). A worker claims the
    row to notify the tenant (webhook and/or email); the outcome is kept here for staff."""

    owner = models.CharField(max_length=32, help_text='Whose budget: "tenant:<id>" or "key:<id>".')
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="budget_alerts")
    api_key = models.ForeignKey(
        "tenancy.ApiKey", on_delete=models.CASCADE, null=True, blank=True, related_name="budget_alerts"
    )
    month = models.DateField(help_text="First day of the calendar month (UTC).")
    level = models.CharField(max_length=8, choices=BudgetAlertLevel.choices)
    threshold_percent = models.PositiveSmallIntegerField()
    spend_micros = models.BigIntegerField(help_text="Spend this month when the alert was raised.")
    limit_micros = models.BigIntegerField()
    created_at = models.DateTimeField(default=timezone.now)
    notified_at = models.DateTimeField(null=True, blank=True, help_text="When a worker took it to notify.")
    webhook_result = models.CharField(max_length=200, blank=True)
    webhook_attempts = models.PositiveSmallIntegerField(default=0)
    webhook_next_attempt_at = models.DateTimeField(
        null=True, blank=True, help_text="When the webhook is tried again; empty: delivered, given up or none."
    )
    email_result = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["owner", "month", "level"], name="budget_alert_once_a_month")]
        indexes = [models.Index(fields=["tenant", "month"]), models.Index(fields=["webhook_next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.owner} {self.month:%Y-%m} {self.level}"
