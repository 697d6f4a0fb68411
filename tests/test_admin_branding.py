"""The bare host leads to the admin, the admin names CrossLogic and has an icon."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.test import Client

pytestmark = pytest.mark.django_db


def test_root_redirects_to_the_admin() -> None:
    response = Client().get("/")
    assert response.status_code == 302 and response["Location"] == "/admin/"
    assert Client().get("/", follow=True).redirect_chain[-1][0].startswith("/admin/login/")


def test_favicon_exists_and_is_linked_from_every_admin_page() -> None:
    icon = Path(settings.BASE_DIR) / "static" / "favicon.svg"
    assert icon.read_text().lstrip().startswith("<svg") and "CrossLogic" in icon.read_text()
    login = Client().get("/admin/login/").content.decode()
    assert '<link rel="icon" type="image/svg+xml" href="/static/favicon.svg">' in login
    fallback = Client().get("/favicon.ico")
    assert fallback.status_code == 302 and fallback["Location"] == "/static/favicon.svg"


def test_admin_header_and_title_name_crosslogic() -> None:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@crosslogic.test", "pw-root-123456"))
    page = client.get("/admin/").content.decode()
    assert '<div id="site-name"><a href="/admin/">CrossLogic</a></div>' in page
    assert "<title>Control plane | CrossLogic admin</title>" in page
    assert "Django administration" not in page and "Django site admin" not in page
