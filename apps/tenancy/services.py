"""Writes for tenants, API keys and staff tokens."""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar

from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from apps.core import invalidation, sealing
from apps.core import secrets as tokens
from apps.tenancy.models import ApiKey, Scope, Secret, StaffToken, Tenant, TenantStatus

STAFF_TOKEN_PREFIX = "cls_"  # noqa: S105 - a public prefix, not a secret
_LIMIT_FIELDS = ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests")
# What tenant_update may change; status goes through suspend/reactivate so it is always logged.
_BUDGET_FIELDS = ("monthly_token_budget", "monthly_spend_limit_micros", "budget_alert_percent", "budget_webhook_url")
_TENANT_EDITABLE = ("slug", "name", "contact_email", *_LIMIT_FIELDS, *_BUDGET_FIELDS)
# What api_key_update may change; prefix, digest and tenant are fixed for a key's life.
_KEY_EDITABLE = ("name", "scopes", "allowed_models", *_LIMIT_FIELDS, "monthly_spend_limit_micros", "expires_at")
_S = TypeVar("_S", bound=Secret)


def tenant_create(*, slug: str, name: str = "", contact_email: str = "", **limits: int | str | None) -> Tenant:
    tenant = Tenant(slug=slug, name=name or slug, contact_email=contact_email)
    for field, value in limits.items():
        if field not in (*_LIMIT_FIELDS, *_BUDGET_FIELDS):
            raise ValidationError({field: "Unknown tenant limit."})
        if value is not None:
            setattr(tenant, field, value)
    tenant.full_clean()
    tenant.save()
    return tenant


def tenant_update(*, tenant: Tenant, **fields: object) -> Tenant:
    _refuse_fields(fields, allowed=_TENANT_EDITABLE)
    for field, value in fields.items():
        setattr(tenant, field, value)
    tenant.full_clean()
    tenant.save()
    invalidation.bump(invalidation.KEYS)
    return tenant


def tenant_delete(*, tenant: Tenant) -> None:
    """Delete a tenant and its keys. Refused once it has usage: billing history is kept."""
    from apps.metering.models import UsageRecord

    if UsageRecord.objects.filter(tenant=tenant).exists():
        raise ValidationError(
            {"tenant": f"Tenant {tenant.slug!r} has usage records and cannot be deleted; suspend it instead."}
        )
    tenant.delete()
    invalidation.bump(invalidation.KEYS)


def _refuse_fields(fields: dict[str, object], *, allowed: tuple[str, ...]) -> None:
    refused = sorted(set(fields) - set(allowed))
    if refused:
        raise ValidationError({name: "This field cannot be changed here." for name in refused})


def tenant_set_status(*, tenant: Tenant, status: str, reason: str = "") -> Tenant:
    if status not in TenantStatus.values:
        raise ValidationError({"status": f"Unknown status {status!r}."})
    tenant.status = status
    tenant.status_reason = reason
    tenant.save(update_fields=["status", "status_reason", "updated_at"])
    invalidation.bump(invalidation.KEYS)
    return tenant


def tenant_suspend(*, tenant: Tenant, reason: str = "") -> Tenant:
    return tenant_set_status(tenant=tenant, status=TenantStatus.SUSPENDED, reason=reason)


def tenant_reactivate(*, tenant: Tenant) -> Tenant:
    return tenant_set_status(tenant=tenant, status=TenantStatus.ACTIVE)


def validate_scopes(scopes: list[str]) -> list[str]:
    """Sorted unique scopes, or ValidationError naming ``scopes``."""
    unknown = sorted(set(scopes) - set(Scope.values))
    if unknown:
        raise ValidationError({"scopes": f"Unknown scope(s): {', '.join(unknown)}. Valid: {', '.join(Scope.values)}."})
    if not scopes:
        raise ValidationError({"scopes": "A key needs at least one scope."})
    return sorted(set(scopes))


def validate_models(names: list[str]) -> list[str]:
    """Sorted unique served names that exist in the catalog, or ValidationError naming ``allowed_models``."""
    from apps.catalog.models import ServedModel

    names = sorted(set(names))
    known = set(ServedModel.objects.filter(name__in=names).values_list("name", flat=True))
    missing = [n for n in names if n not in known]
    if missing:
        raise ValidationError({"allowed_models": f"Unknown model(s): {', '.join(missing)}."})
    return names


def api_key_issue(
    *,
    tenant: Tenant,
    name: str = "",
    scopes: list[str] | None = None,
    allowed_models: list[str] | None = None,
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent_requests: int | None = None,
    monthly_spend_limit_micros: int | None = None,
) -> tuple[ApiKey, str]:
    """Create a key; return it with the raw secret, which is never stored or shown again."""
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "Expiry must be in the future."})
    raw, prefix, digest = tokens.new_token(settings.API_KEY_PREFIX)
    key = ApiKey(
        tenant=tenant,
        name=name,
        prefix=prefix,
        digest=digest,
        scopes=validate_scopes(scopes if scopes is not None else [Scope.INFERENCE]),
        allowed_models=validate_models(allowed_models or []),
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrent_requests=max_concurrent_requests,
        monthly_spend_limit_micros=monthly_spend_limit_micros,
    )
    key.full_clean(exclude=["tenant"])
    key.save()
    # A gateway that remembered this prefix as unknown must learn about the new key at once.
    invalidation.bump(invalidation.KEYS)
    return key, raw


def api_key_issue_delegated(
    *,
    issuer: ApiKey,
    name: str = "",
    scopes: list[str] | None = None,
    allowed_models: list[str] | None = None,
    expires_at: datetime | None = None,
    **limits: int | None,
) -> tuple[ApiKey, str]:
    """A customer key with ``keys:manage`` issues a key for its own tenant.

    The new key can never do more than its issuer: scopes are a subset of the issuer's, models
    are within the issuer's allow-list, limits are at most the issuer's effective limits, and
    it expires no later than the issuer. Whatever is left unset is inherited from the issuer,
    so omitting a field is never a way around these rules.
    """
    if not issuer.has_scope(Scope.KEYS_MANAGE):
        raise PermissionDenied("This key lacks the keys:manage scope.")
    errors: dict[str, str] = {}
    wanted_scopes: list[str] = scopes if scopes is not None else [Scope.INFERENCE]
    beyond = sorted(set(wanted_scopes) - set(issuer.scopes))
    if beyond:
        errors["scopes"] = f"A key can only grant scopes it holds itself; not held: {', '.join(beyond)}."
    if issuer.allowed_models:
        if allowed_models:
            outside = sorted(set(allowed_models) - set(issuer.allowed_models))
            if outside:
                errors["allowed_models"] = f"Not allowed for the issuing key: {', '.join(outside)}."
        else:
            allowed_models = list(issuer.allowed_models)
    effective: dict[str, int | None] = {}
    for field in _LIMIT_FIELDS:
        ceiling = getattr(issuer, field) or getattr(issuer.tenant, field)
        wanted = limits.pop(field, None)
        if wanted is not None and wanted > ceiling:
            errors[field] = f"At most {ceiling} (the issuing key's limit)."
        effective[field] = wanted if wanted is not None else getattr(issuer, field)
    if limits:
        errors.update({field: "Unknown key limit." for field in limits})
    if issuer.expires_at is not None:
        if expires_at is None:
            expires_at = issuer.expires_at
        elif expires_at > issuer.expires_at:
            errors["expires_at"] = f"Must not be later than the issuing key's expiry ({issuer.expires_at.isoformat()})."
    if errors:
        raise ValidationError(errors)
    return api_key_issue(
        tenant=issuer.tenant,
        name=name,
        scopes=wanted_scopes,
        allowed_models=allowed_models,
        expires_at=expires_at,
        **effective,
    )


def _secret_verify(queryset: QuerySet[_S], *, raw: str, marker: str) -> _S | None:
    """The usable secret matching ``raw``: one indexed lookup plus a constant-time compare."""
    prefix = tokens.split_prefix(raw, marker)
    if prefix is None:
        return None
    secret = queryset.filter(prefix=prefix).first()
    if secret is None or not tokens.matches(raw, secret.digest) or not secret.is_usable():
        return None
    return secret


def last_used_due(*, last_used_at: datetime | None, now: datetime) -> bool:
    """Whether a use at ``now`` is worth writing: last_used_at moves at most once per resolution
    window, so verifying a key stays read-mostly. The gateway applies the same rule in memory."""
    return last_used_at is None or now - last_used_at >= timedelta(seconds=settings.API_KEY_LAST_USED_RESOLUTION_S)


def _secret_touch(secret: Secret, *, now: datetime | None = None) -> None:
    now = now or timezone.now()
    if last_used_due(last_used_at=secret.last_used_at, now=now):
        type(secret).objects.filter(pk=secret.pk).update(last_used_at=now)
        secret.last_used_at = now


def api_key_verify(*, raw: str) -> ApiKey | None:
    """The usable key matching ``raw``, its tenant loaded (the caller checks the tenant's status)."""
    return _secret_verify(ApiKey.objects.select_related("tenant"), raw=raw, marker=settings.API_KEY_PREFIX)


def api_key_touch(*, key: ApiKey, now: datetime | None = None) -> None:
    """Record use, at most once per resolution window (last_used_due)."""
    _secret_touch(key, now=now)


def api_keys_touch(*, last_used: Mapping[int, datetime]) -> None:
    """Record uses the gateway collected: key id -> time of use, already thinned by last_used_due.

    A conditional update, so a worker that flushes late never moves last_used_at backwards."""
    for key_id, when in last_used.items():
        ApiKey.objects.filter(pk=key_id).filter(Q(last_used_at__isnull=True) | Q(last_used_at__lt=when)).update(
            last_used_at=when
        )


def api_key_revoke(*, key: ApiKey, reason: str = "") -> ApiKey:
    """Revoke now (idempotent: an already revoked key keeps its first date and reason)."""
    if key.revoked_at is None:
        key.revoked_at = timezone.now()
        key.revoked_reason = reason[:500]
        key.save(update_fields=["revoked_at", "revoked_reason"])
        invalidation.bump(invalidation.KEYS)
    return key


def api_key_update(*, key: ApiKey, **fields: Any) -> ApiKey:
    _refuse_fields(fields, allowed=_KEY_EDITABLE)
    if "scopes" in fields:
        fields["scopes"] = validate_scopes(list(fields["scopes"]))
    if "allowed_models" in fields:
        fields["allowed_models"] = validate_models(list(fields["allowed_models"] or []))
    for field, value in fields.items():
        setattr(key, field, value)
    key.full_clean(exclude=["tenant"])
    key.save()
    invalidation.bump(invalidation.KEYS)
    return key


@transaction.atomic
def staff_token_issue(*, user: User, name: str = "", expires_at: datetime | None = None) -> tuple[StaffToken, str]:
    if not user.is_staff:
        raise ValidationError({"user": "Only staff users can hold staff tokens."})
    if expires_at is not None and expires_at <= timezone.now():
        raise ValidationError({"expires_at": "Expiry must be in the future."})
    raw, prefix, digest = tokens.new_token(STAFF_TOKEN_PREFIX)
    token = StaffToken.objects.create(user=user, name=name, prefix=prefix, digest=digest, expires_at=expires_at)
    return token, raw


def staff_token_verify(*, raw: str) -> StaffToken | None:
    """The usable token matching ``raw`` whose user is still an active staff user."""
    token = _secret_verify(StaffToken.objects.select_related("user"), raw=raw, marker=STAFF_TOKEN_PREFIX)
    if token is None or not token.user.is_active or not token.user.is_staff:
        return None
    return token


def staff_token_touch(*, token: StaffToken, now: datetime | None = None) -> None:
    """Record use, at most once per resolution window, like api_key_touch."""
    _secret_touch(token, now=now)


def staff_token_revoke(*, token: StaffToken, reason: str = "") -> StaffToken:
    if token.revoked_at is None:
        token.revoked_at = timezone.now()
        token.revoked_reason = reason[:500]
        token.save(update_fields=["revoked_at", "revoked_reason"])
    return token


# --- budget webhook signing secret ----------------------------------------------------------

WEBHOOK_SECRET_PREFIX = "whsec_"  # noqa: S105 - a public prefix, not a secret
_WEBHOOK_SEAL_PURPOSE = "budget-webhook-secret"


def _webhook_secret_seal(tenant: Tenant, *, now: datetime | None = None) -> str:
    raw = WEBHOOK_SECRET_PREFIX + secrets.token_urlsafe(32)
    tenant.budget_webhook_secret_sealed = sealing.seal(
        raw, server_secret=settings.WEBHOOK_SECRET_KEY, purpose=_WEBHOOK_SEAL_PURPOSE
    )
    tenant.budget_webhook_secret_rotated_at = now or timezone.now()
    Tenant.objects.filter(pk=tenant.pk).update(
        budget_webhook_secret_sealed=tenant.budget_webhook_secret_sealed,
        budget_webhook_secret_rotated_at=tenant.budget_webhook_secret_rotated_at,
    )
    return raw


def tenant_webhook_secret_rotate(*, tenant: Tenant, now: datetime | None = None) -> str:
    """Give the tenant a new signing secret (the old one stops at once) and return it raw: the
    caller shows it once, like an API key; it is stored only sealed."""
    return _webhook_secret_seal(tenant, now=now)


def tenant_webhook_secret(*, tenant: Tenant) -> str:
    """The secret a delivery is signed with. A tenant without one (or whose sealed secret no
    longer unseals because WEBHOOK_SECRET_KEY changed) gets one now, so no delivery ever goes out
    unsigned; the tenant sees it only by rotating it."""
    if tenant.budget_webhook_secret_sealed:
        raw = sealing.unseal(
            tenant.budget_webhook_secret_sealed,
            server_secret=settings.WEBHOOK_SECRET_KEY,
            purpose=_WEBHOOK_SEAL_PURPOSE,
        )
        if raw is not None:
            return raw
    return _webhook_secret_seal(tenant)
