from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from apps.tenancy.models import ApiKey
from apps.tenancy.services import api_key_issue, api_key_revoke, api_key_verify

pytestmark = pytest.mark.django_db


def test_issued_key_is_stored_only_as_digest(tenant) -> None:
    key, raw = api_key_issue(tenant=tenant, name="ci")
    assert raw.startswith("clk_") and raw.startswith(key.prefix) and len(key.prefix) == 12
    stored = ApiKey.objects.values().get(pk=key.pk)
    assert raw not in {str(v) for v in stored.values()}
    assert api_key_verify(raw=raw).pk == key.pk


def test_wrong_secret_with_right_prefix_is_rejected(api_key) -> None:
    _, raw = api_key
    forged = raw[:-1] + ("a" if raw[-1] != "a" else "b")
    assert api_key_verify(raw=forged) is None
    assert api_key_verify(raw="clk_short") is None
    assert api_key_verify(raw="") is None


def test_revoked_key_no_longer_verifies(api_key) -> None:
    key, raw = api_key
    api_key_revoke(key=key)
    assert api_key_verify(raw=raw) is None


def test_expired_key_no_longer_verifies(tenant) -> None:
    key, raw = api_key_issue(tenant=tenant, expires_at=timezone.now() + timedelta(seconds=60))
    ApiKey.objects.filter(pk=key.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert api_key_verify(raw=raw) is None


def test_unknown_scope_and_model_are_refused(tenant) -> None:
    with pytest.raises(ValidationError) as exc:
        api_key_issue(tenant=tenant, scopes=["inference", "root"])
    assert "scopes" in exc.value.message_dict
    with pytest.raises(ValidationError) as exc:
        api_key_issue(tenant=tenant, allowed_models=["no-such-model"])
    assert "allowed_models" in exc.value.message_dict
    assert not ApiKey.objects.exists()
