"""API keys and staff tokens share one status rule: in Python, in SQL, and in the touch throttle."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from apps.tenancy import services
from apps.tenancy.models import ApiKey, SecretStatus, StaffToken

pytestmark = pytest.mark.django_db


def _one_of_each(make) -> dict[SecretStatus, object]:
    """An active, an expired and a revoked secret, and one that expires later (active too)."""
    active, expired, revoked, later = (make() for _ in range(4))
    model = type(active)
    now = timezone.now()
    model.objects.filter(pk=expired.pk).update(expires_at=now - timedelta(seconds=1))
    model.objects.filter(pk=later.pk).update(expires_at=now + timedelta(hours=1))
    model.objects.filter(pk=revoked.pk).update(revoked_at=now, expires_at=now - timedelta(seconds=1))
    return {
        SecretStatus.ACTIVE: {active.pk, later.pk},
        SecretStatus.EXPIRED: {expired.pk},
        SecretStatus.REVOKED: {revoked.pk},
    }


@pytest.mark.parametrize("kind", ["api_key", "staff_token"])
def test_status_in_sql_matches_status_in_python(kind, tenant) -> None:
    model: type[ApiKey | StaffToken]
    make: Callable[[], ApiKey | StaffToken]
    if kind == "api_key":
        model, make = ApiKey, lambda: services.api_key_issue(tenant=tenant)[0]
    else:
        user = User.objects.create_user("op", is_staff=True)
        model, make = StaffToken, lambda: services.staff_token_issue(user=user)[0]
    expected = _one_of_each(make)
    for status, pks in expected.items():
        assert set(model.objects.with_status(status).values_list("pk", flat=True)) == pks
        assert {row.pk for row in model.objects.all() if row.status == status} == pks
        assert all(row.is_usable() == (status == SecretStatus.ACTIVE) for row in model.objects.filter(pk__in=pks))


def test_unknown_status_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="Unknown status 'lost'"):
        ApiKey.objects.with_status("lost")


def test_api_key_touch_writes_at_most_once_per_window(api_key, settings, django_assert_num_queries) -> None:
    settings.API_KEY_LAST_USED_RESOLUTION_S = 60
    key, _ = api_key
    first = timezone.now()
    with django_assert_num_queries(1):
        services.api_key_touch(key=key, now=first)
    with django_assert_num_queries(0):
        services.api_key_touch(key=key, now=first + timedelta(seconds=59))
    with django_assert_num_queries(1):
        services.api_key_touch(key=key, now=first + timedelta(seconds=60))
    key.refresh_from_db()
    assert key.last_used_at == first + timedelta(seconds=60)


def test_staff_token_touch_follows_the_same_rule(settings, django_assert_num_queries) -> None:
    settings.API_KEY_LAST_USED_RESOLUTION_S = 60
    token, _ = services.staff_token_issue(user=User.objects.create_user("op", is_staff=True))
    now = timezone.now()
    services.staff_token_touch(token=token, now=now)
    with django_assert_num_queries(0):
        services.staff_token_touch(token=token, now=now + timedelta(seconds=30))
    token.refresh_from_db()
    assert token.last_used_at == now


def test_gateway_batch_touch_never_moves_last_used_backwards(api_key, tenant) -> None:
    key, _ = api_key
    other, _ = services.api_key_issue(tenant=tenant)
    now = timezone.now()
    services.api_keys_touch(last_used={key.pk: now, other.pk: now - timedelta(minutes=5)})
    services.api_keys_touch(last_used={key.pk: now - timedelta(minutes=1)})  # a late flush from another worker
    key.refresh_from_db()
    other.refresh_from_db()
    assert (key.last_used_at, other.last_used_at) == (now, now - timedelta(minutes=5))


def test_last_used_due_is_the_window(settings) -> None:
    settings.API_KEY_LAST_USED_RESOLUTION_S = 10
    now = timezone.now()
    assert services.last_used_due(last_used_at=None, now=now)
    assert not services.last_used_due(last_used_at=now - timedelta(seconds=9), now=now)
    assert services.last_used_due(last_used_at=now - timedelta(seconds=10), now=now)
