from __future__ import annotations

from django.db import models
from django.utils import timezone


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
    email_result = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [models.UniqueConstraint(fields=["owner", "month", "level"], name="budget_alert_once_a_month")]
        indexes = [models.Index(fields=["tenant", "month"])]

    def __str__(self) -> str:
        return f"{self.owner} {self.month:%Y-%m} {self.level}"
