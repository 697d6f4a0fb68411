from __future__ import annotations

from datetime import datetime

from django.core.validators import MaxValueValidator, MinValueValidator, URLValidator
from django.db import models
from django.db.models import Q
from django.utils import timezone


class TenantStatus(models.TextChoices):
    ACTIVE = "active", "Active"
    SUSPENDED = "suspended", "Suspended"


class Tenant(models.Model):
    slug = models.SlugField(max_length=64, unique=True)
    name = models.CharField(max_length=200)
    contact_email = models.EmailField(blank=True)
    status = models.CharField(max_length=16, choices=TenantStatus.choices, default=TenantStatus.ACTIVE)
    status_reason = models.CharField(max_length=500, blank=True)
    requests_per_minute = models.PositiveIntegerField(default=600, validators=[MinValueValidator(1)])
    tokens_per_minute = models.PositiveIntegerField(default=200_000, validators=[MinValueValidator(1)])
    max_concurrent_requests = models.PositiveIntegerField(default=32, validators=[MinValueValidator(1)])
    monthly_token_budget = models.PositiveBigIntegerField(
        null=True, blank=True, help_text="Tokens per calendar month; empty means unlimited."
    )
    monthly_spend_limit_micros = models.PositiveBigIntegerField(
        "monthly spend limit (micro-US$)",
        null=True,
        blank=True,
        help_text="US$ per calendar month (UTC), in millionths: 25000000 = $25. Empty means no limit.",
    )
    budget_alert_percent = models.PositiveSmallIntegerField(
        default=80,
        validators=[MinValueValidator(1), MaxValueValidator(100)],
        help_text="Soft threshold: at this percent of a spend limit (the tenant's or a key's) staff see a "
        "flag and the tenant is told, once a month.",
    )
    budget_webhook_url = models.URLField(
        max_length=500,
        blank=True,
        # URLField alone also takes ftp:// and ftps://; a webhook is http(s) only.
        validators=[URLValidator(schemes=["http", "https"])],
        help_text="Optional: budget alerts are POSTed here as JSON (besides an email to the contact address).",
    )
    # The key deliveries are signed with (docs/metering.md), sealed (apps.core.sealing): the tenant
    # verifies with the same value, so unlike an API key it must be recoverable. Shown once, when
    # rotated; never rendered or serialized.
    budget_webhook_secret_sealed = models.TextField(blank=True, editable=False)
    budget_webhook_secret_rotated_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug

    @property
    def is_active(self) -> bool:
        return self.status == TenantStatus.ACTIVE


class Scope(models.TextChoices):
    INFERENCE = "inference", "Inference (/v1)"
    USAGE_READ = "usage:read", "Read usage"
    KEYS_MANAGE = "keys:manage", "Manage keys"


class SecretStatus(models.TextChoices):
    """What an API key or staff token is now, computed from its revoked_at and expires_at."""

    ACTIVE = "active", "Active"
    REVOKED = "revoked", "Revoked"
    EXPIRED = "expired", "Expired"


def secret_status(
    *, revoked_at: datetime | None, expires_at: datetime | None, now: datetime | None = None
) -> SecretStatus:
    """The one rule, shared by the models below and the gateway's cached key entries.

    ``now`` is read only for a secret that expires: the gateway asks on every request."""
    if revoked_at is not None:
        return SecretStatus.REVOKED
    if expires_at is not None and expires_at <= (now or timezone.now()):
        return SecretStatus.EXPIRED
    return SecretStatus.ACTIVE


class SecretQuerySet(models.QuerySet):
    def with_status(self, status: str, *, now: datetime | None = None) -> SecretQuerySet:
        """The rows whose computed status is ``status`` (the SQL twin of ``secret_status``)."""
        now = now or timezone.now()
        if status == SecretStatus.REVOKED:
            return self.filter(revoked_at__isnull=False)
        if status == SecretStatus.EXPIRED:
            return self.filter(revoked_at__isnull=True, expires_at__lte=now)
        if status == SecretStatus.ACTIVE:
            return self.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=now), revoked_at__isnull=True)
        raise ValueError(f"Unknown status {status!r}; one of {', '.join(SecretStatus.values)}.")


class Secret(models.Model):
    """A bearer secret stored only as a digest (API keys, staff tokens): shown once, expires, revoked."""

    name = models.CharField(max_length=100, blank=True)
    prefix = models.CharField(max_length=16, unique=True, editable=False)
    digest = models.CharField(max_length=64, editable=False)
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    revoked_reason = models.CharField(max_length=500, blank=True, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    created_at = models.DateTimeField(default=timezone.now, editable=False)

    objects = SecretQuerySet.as_manager()

    class Meta:
        abstract = True
        ordering = ["-created_at"]

    def status_at(self, now: datetime | None = None) -> SecretStatus:
        return secret_status(revoked_at=self.revoked_at, expires_at=self.expires_at, now=now)

    @property
    def status(self) -> SecretStatus:
        return self.status_at()

    def is_usable(self, now: datetime | None = None) -> bool:
        return self.status_at(now) == SecretStatus.ACTIVE


class ApiKey(Secret):
    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="api_keys")
    scopes = models.JSONField(default=list)
    allowed_models = models.JSONField(
        default=list, blank=True, help_text="Served model names this key may call; empty means all."
    )
    requests_per_minute = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    tokens_per_minute = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    max_concurrent_requests = models.PositiveIntegerField(null=True, blank=True, validators=[MinValueValidator(1)])
    monthly_spend_limit_micros = models.PositiveBigIntegerField(
        "monthly spend limit (micro-US$)",
        null=True,
        blank=True,
        help_text="This key's own US$ per calendar month, in millionths (besides the tenant's). Empty: none.",
    )

    class Meta(Secret.Meta):
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.name or 'unnamed'})"

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    def allows_model(self, served_name: str) -> bool:
        return not self.allowed_models or served_name in self.allowed_models


class StaffToken(Secret):
    """A management-API token for a staff user; stored, like API keys, only as a digest."""

    user = models.ForeignKey("auth.User", on_delete=models.CASCADE, related_name="staff_tokens")

    def __str__(self) -> str:
        return f"{self.prefix}… ({self.user})"
