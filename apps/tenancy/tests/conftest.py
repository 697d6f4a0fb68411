from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient


@pytest.fixture
def staff_user(db) -> User:
    return User.objects.create_user("operator", password="pw-operator-1", is_staff=True)


@pytest.fixture
def staff_token(staff_user):
    """(StaffToken, raw) for a staff user who is not a superuser."""
    from apps.tenancy.services import staff_token_issue

    return staff_token_issue(user=staff_user, name="ci")


@pytest.fixture
def staff_api(staff_token) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {staff_token[1]}")
    return client


def bearer(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client
