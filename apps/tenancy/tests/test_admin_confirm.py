"""Revoking a key or token and suspending a tenant ask for confirmation and a reason, from the
object's page and from the list's bulk action; the reason is recorded through the services."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from apps.tenancy.models import ApiKey, StaffToken, Tenant, TenantStatus
from apps.tenancy.services import api_key_issue, api_key_verify, staff_token_issue, tenant_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(db) -> Client:
    user = User.objects.create_superuser("root", "root@crosslogic.test", "pw-root-123456")
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def viewer_client(db) -> Client:
    viewer = User.objects.create_user("viewer", password="pw-viewer-123456", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_tenant", "view_apikey"]))
    client = Client()
    client.force_login(viewer)
    return client


def _key(slug: str = "acme") -> tuple[ApiKey, str]:
    tenant = Tenant.objects.filter(slug=slug).first() or tenant_create(slug=slug)
    return api_key_issue(tenant=tenant, name=f"key-{ApiKey.objects.count()}", scopes=["inference"])


# --- one key, from its page ------------------------------------------------------------------


def test_key_page_has_a_revoke_button_that_opens_a_confirmation(admin_client_) -> None:
    key, raw = _key()
    page = admin_client_.get(reverse("admin:tenancy_apikey_change", args=[key.pk])).content.decode()
    url = reverse("admin:tenancy_apikey_revoke", args=[key.pk])
    assert f'href="{url}"' in page

    asked = admin_client_.get(url)

    text = asked.content.decode()
    assert asked.status_code == 200 and "Yes, revoke" in text and 'name="reason"' in text and key.prefix in text
    assert api_key_verify(raw=raw) is not None  # nothing happened yet


def test_revoking_without_a_reason_is_a_form_error_and_revokes_nothing(admin_client_) -> None:
    key, raw = _key()

    response = admin_client_.post(
        reverse("admin:tenancy_apikey_revoke", args=[key.pk]), {"confirm": "1", "reason": " "}
    )

    assert response.status_code == 200 and "This field is required." in response.content.decode()
    assert api_key_verify(raw=raw) is not None


def test_a_reason_longer_than_the_column_is_a_form_error(admin_client_) -> None:
    key, raw = _key()
    response = admin_client_.post(
        reverse("admin:tenancy_apikey_revoke", args=[key.pk]), {"confirm": "1", "reason": "x" * 501}
    )
    assert response.status_code == 200 and "at most 500 characters" in response.content.decode()
    assert api_key_verify(raw=raw) is not None


def test_revoking_with_a_reason_records_it_and_who_gave_it(admin_client_) -> None:
    key, raw = _key()

    response = admin_client_.post(
        reverse("admin:tenancy_apikey_revoke", args=[key.pk]), {"confirm": "1", "reason": "posted on GitHub"}
    )

    assert response.status_code == 302
    assert response["Location"] == reverse("admin:tenancy_apikey_change", args=[key.pk])
    key.refresh_from_db()
    assert api_key_verify(raw=raw) is None
    assert key.revoked_reason == "posted on GitHub (staff:root)"
    page = admin_client_.get(reverse("admin:tenancy_apikey_change", args=[key.pk])).content.decode()
    assert "posted on GitHub (staff:root)" in page
    assert 'id="object-action-revoke"' not in page  # nothing left to revoke


def test_revoking_twice_keeps_the_first_date_and_reason(admin_client_) -> None:
    key, _ = _key()
    url = reverse("admin:tenancy_apikey_revoke", args=[key.pk])
    admin_client_.post(url, {"confirm": "1", "reason": "first"})
    first = ApiKey.objects.get(pk=key.pk)

    again = admin_client_.post(url, {"confirm": "1", "reason": "second"}, follow=True)

    assert again.status_code == 200 and "Nothing to do" in again.content.decode()
    key.refresh_from_db()
    assert (key.revoked_at, key.revoked_reason) == (first.revoked_at, first.revoked_reason)


def test_staff_without_change_permission_cannot_revoke_or_suspend(viewer_client) -> None:
    key, raw = _key()
    page = viewer_client.get(reverse("admin:tenancy_apikey_change", args=[key.pk])).content.decode()
    assert 'id="object-action-revoke"' not in page

    assert viewer_client.get(reverse("admin:tenancy_apikey_revoke", args=[key.pk])).status_code == 403
    revoke = viewer_client.post(reverse("admin:tenancy_apikey_revoke", args=[key.pk]), {"confirm": "1", "reason": "x"})
    suspend = viewer_client.post(
        reverse("admin:tenancy_tenant_suspend", args=[key.tenant_id]), {"confirm": "1", "reason": "x"}
    )

    assert revoke.status_code == 403 and suspend.status_code == 403
    assert api_key_verify(raw=raw) is not None
    assert Tenant.objects.get(pk=key.tenant_id).status == TenantStatus.ACTIVE
    bulk = viewer_client.post(
        reverse("admin:tenancy_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk], "confirm": "1", "reason": "x"},
    )
    assert bulk.status_code in {200, 302, 403} and api_key_verify(raw=raw) is not None


def test_unknown_objects_are_404(admin_client_) -> None:
    assert admin_client_.get(reverse("admin:tenancy_apikey_revoke", args=[999999])).status_code == 404
    assert admin_client_.get(reverse("admin:tenancy_tenant_suspend", args=[999999])).status_code == 404


# --- many keys, from the list ---------------------------------------------------------------


def test_bulk_revoke_confirms_with_the_selection_then_revokes_exactly_it(admin_client_) -> None:
    chosen = [_key() for _ in range(2)]
    _, spared_raw = _key()
    changelist = reverse("admin:tenancy_apikey_changelist")
    selection = {"action": "revoke", "_selected_action": [k.pk for k, _ in chosen]}

    asked = admin_client_.post(changelist, selection)

    text = asked.content.decode()
    assert asked.status_code == 200 and "Revoke 2 key(s)?" in text
    for key, _ in chosen:  # the page re-posts the selection with the reason
        assert f'name="_selected_action" value="{key.pk}"' in text
    assert 'name="action" value="revoke"' in text
    no_reason = admin_client_.post(changelist, {**selection, "confirm": "1", "reason": ""})
    assert no_reason.status_code == 200 and "This field is required." in no_reason.content.decode()
    assert all(api_key_verify(raw=raw) is not None for _, raw in chosen)

    done = admin_client_.post(changelist, {**selection, "confirm": "1", "reason": "tenant asked"})

    assert done.status_code == 302
    assert all(api_key_verify(raw=raw) is None for _, raw in chosen)
    assert api_key_verify(raw=spared_raw) is not None
    assert set(ApiKey.objects.filter(revoked_at__isnull=False).values_list("revoked_reason", flat=True)) == {
        "tenant asked (staff:root)"
    }


def test_bulk_revoke_across_every_page_keeps_select_across(admin_client_) -> None:
    keys = [_key() for _ in range(3)]
    changelist = reverse("admin:tenancy_apikey_changelist")
    selection = {"action": "revoke", "_selected_action": [keys[0][0].pk], "select_across": "1"}

    asked = admin_client_.post(changelist, selection).content.decode()
    assert 'name="select_across" value="1"' in asked and "Revoke 3 key(s)?" in asked

    admin_client_.post(changelist, {**selection, "confirm": "1", "reason": "rotate everything"})

    assert all(api_key_verify(raw=raw) is None for _, raw in keys)


def test_bulk_revoke_of_staff_tokens_asks_too(admin_client_) -> None:
    user = User.objects.get(username="root")
    token, _ = staff_token_issue(user=user, name="ci")
    changelist = reverse("admin:tenancy_stafftoken_changelist")

    asked = admin_client_.post(changelist, {"action": "revoke", "_selected_action": [token.pk]})
    assert asked.status_code == 200 and "Yes, revoke" in asked.content.decode()
    assert StaffToken.objects.get(pk=token.pk).revoked_at is None

    admin_client_.post(
        changelist, {"action": "revoke", "_selected_action": [token.pk], "confirm": "1", "reason": "left"}
    )

    token.refresh_from_db()
    assert token.revoked_at is not None and token.revoked_reason == "left (staff:root)"


# --- tenants ---------------------------------------------------------------------------------


def test_tenant_page_suspend_button_confirms_and_records_the_reason(admin_client_) -> None:
    tenant = tenant_create(slug="globex")
    page = admin_client_.get(reverse("admin:tenancy_tenant_change", args=[tenant.pk])).content.decode()
    url = reverse("admin:tenancy_tenant_suspend", args=[tenant.pk])
    assert f'href="{url}"' in page

    asked = admin_client_.get(url)
    assert asked.status_code == 200 and "Yes, suspend" in asked.content.decode()
    missing = admin_client_.post(url, {"confirm": "1"})
    assert missing.status_code == 200 and "This field is required." in missing.content.decode()
    assert Tenant.objects.get(pk=tenant.pk).status == TenantStatus.ACTIVE

    admin_client_.post(url, {"confirm": "1", "reason": "chargeback"})

    tenant.refresh_from_db()
    assert tenant.status == TenantStatus.SUSPENDED and tenant.status_reason == "chargeback (staff:root)"
    page = admin_client_.get(reverse("admin:tenancy_tenant_change", args=[tenant.pk])).content.decode()
    assert 'id="object-action-suspend"' not in page and "chargeback (staff:root)" in page


def test_bulk_suspend_asks_then_suspends_only_active_tenants(admin_client_) -> None:
    active = [tenant_create(slug=f"t{i}") for i in range(2)]
    changelist = reverse("admin:tenancy_tenant_changelist")
    selection = {"action": "suspend", "_selected_action": [t.pk for t in active]}

    asked = admin_client_.post(changelist, selection)
    assert asked.status_code == 200 and "Suspend 2 active tenant(s)?" in asked.content.decode()
    assert not Tenant.objects.filter(status=TenantStatus.SUSPENDED).exists()

    admin_client_.post(changelist, {**selection, "confirm": "1", "reason": "fraud review"})

    assert set(Tenant.objects.filter(status=TenantStatus.SUSPENDED).values_list("status_reason", flat=True)) == {
        "fraud review (staff:root)"
    }
