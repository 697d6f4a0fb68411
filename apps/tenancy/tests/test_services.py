"""Tenant status, staff tokens, update guards and delegated key issuing."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.core.exceptions import PermissionDenied, ValidationError
from django.utils import timezone

from apps.core import invalidation
from apps.tenancy import services
from apps.tenancy.models import StaffToken, Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(db) -> User:
    return User.objects.create_user("ops", is_staff=True)


def _keys_version(redis_db) -> int:
    return int(redis_db.get(invalidation.version_key(invalidation.KEYS)) or 0)


def test_suspend_and_reactivate_tell_the_gateways_after_commit(tenant, redis_db, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        services.tenant_suspend(tenant=tenant, reason="unpaid")
    assert _keys_version(redis_db) == 1
    tenant.refresh_from_db()
    assert (tenant.status, tenant.status_reason, tenant.is_active) == ("suspended", "unpaid", False)
    with django_capture_on_commit_callbacks(execute=True):
        services.tenant_reactivate(tenant=tenant)
    assert _keys_version(redis_db) == 2
    tenant.refresh_from_db()
    assert tenant.is_active and tenant.status_reason == ""


def test_revoking_a_key_tells_the_gateways(api_key, redis_db, django_capture_on_commit_callbacks) -> None:
    with django_capture_on_commit_callbacks(execute=True):
        services.api_key_revoke(key=api_key[0])
    assert _keys_version(redis_db) == 1


def test_tenant_update_refuses_status_and_unknown_fields(tenant) -> None:
    with pytest.raises(ValidationError) as exc:
        services.tenant_update(tenant=tenant, status="suspended")
    assert "status" in exc.value.message_dict
    with pytest.raises(ValidationError):
        services.tenant_update(tenant=tenant, requests_per_minute=0)
    tenant.refresh_from_db()
    assert tenant.is_active and tenant.requests_per_minute == 600


def test_tenant_delete_removes_its_keys_but_refuses_once_it_has_usage(tenant, api_key) -> None:
    from apps.metering.tests.factories import make_usage

    other = services.tenant_create(slug="other")
    services.tenant_delete(tenant=other)
    assert not Tenant.objects.filter(slug="other").exists()
    make_usage(tenant=tenant)
    with pytest.raises(ValidationError, match="suspend it instead"):
        services.tenant_delete(tenant=tenant)
    assert Tenant.objects.filter(pk=tenant.pk).exists()


def test_api_key_update_cannot_touch_prefix_digest_or_tenant(api_key) -> None:
    key, raw = api_key
    other = services.tenant_create(slug="other")
    for field, value in (("prefix", "clk_00000000"), ("digest", "0" * 64), ("tenant", other), ("revoked_at", None)):
        with pytest.raises(ValidationError) as exc:
            services.api_key_update(key=key, **{field: value})
        assert field in exc.value.message_dict
    assert services.api_key_verify(raw=raw).tenant_id != other.pk


def test_staff_token_round_trip(staff) -> None:
    token, raw = services.staff_token_issue(user=staff, name="ci")
    assert raw.startswith("cls_") and raw.startswith(token.prefix)
    assert raw not in {str(v) for v in StaffToken.objects.values().get(pk=token.pk).values()}
    assert services.staff_token_verify(raw=raw).pk == token.pk
    assert services.staff_token_verify(raw=raw[:-1] + ("x" if raw[-1] != "x" else "y")) is None
    assert services.staff_token_verify(raw=raw.replace("cls_", "clk_", 1)) is None
    services.staff_token_revoke(token=token)
    assert services.staff_token_verify(raw=raw) is None


def test_staff_token_expires_and_dies_with_the_users_staff_status(staff) -> None:
    token, raw = services.staff_token_issue(user=staff, expires_at=timezone.now() + timedelta(minutes=1))
    StaffToken.objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert services.staff_token_verify(raw=raw) is None

    _, raw = services.staff_token_issue(user=staff)
    staff.is_staff = False
    staff.save()
    assert services.staff_token_verify(raw=raw) is None


def test_staff_tokens_only_for_staff_and_only_in_the_future(db, staff) -> None:
    with pytest.raises(ValidationError, match="Only staff"):
        services.staff_token_issue(user=User.objects.create_user("customer"))
    with pytest.raises(ValidationError) as exc:
        services.staff_token_issue(user=staff, expires_at=timezone.now() - timedelta(seconds=1))
    assert "expires_at" in exc.value.message_dict
    assert not StaffToken.objects.exists()


def test_delegated_issue_needs_keys_manage(tenant) -> None:
    issuer, _ = services.api_key_issue(tenant=tenant, scopes=["inference", "usage:read"])
    with pytest.raises(PermissionDenied):
        services.api_key_issue_delegated(issuer=issuer, scopes=["inference"])


def test_delegated_issue_collects_every_escalation_at_once(tenant) -> None:
    issuer, _ = services.api_key_issue(
        tenant=tenant, scopes=["keys:manage"], tokens_per_minute=100, expires_at=timezone.now() + timedelta(hours=1)
    )
    with pytest.raises(ValidationError) as exc:
        services.api_key_issue_delegated(
            issuer=issuer,
            scopes=["inference"],
            tokens_per_minute=101,
            max_concurrent_requests=tenant.max_concurrent_requests + 1,
            expires_at=timezone.now() + timedelta(days=2),
        )
    assert set(exc.value.message_dict) == {"scopes", "tokens_per_minute", "max_concurrent_requests", "expires_at"}


def test_delegated_issue_inherits_what_it_leaves_out(tenant) -> None:
    expiry = timezone.now() + timedelta(hours=1)
    issuer, _ = services.api_key_issue(
        tenant=tenant, scopes=["keys:manage", "inference"], tokens_per_minute=100, expires_at=expiry
    )
    key, raw = services.api_key_issue_delegated(issuer=issuer, scopes=["inference"], requests_per_minute=5)
    assert (key.tenant, key.scopes, key.tokens_per_minute, key.requests_per_minute, key.expires_at) == (
        tenant,
        ["inference"],
        100,
        5,
        expiry,
    )
    assert services.api_key_verify(raw=raw).pk == key.pk
