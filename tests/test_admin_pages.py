"""Every admin page of every registered model renders for a superuser, without N+1 queries,
and issued secrets are shown exactly once and their digests never.

The page test iterates over ``admin.site._registry``: a model another app registers is
covered automatically. Its change page uses an existing row (the shared fixtures create
most), a factory from ``_factories()``, or a row built generically from the field types; if
none of these works the test fails asking for a factory, rather than skipping the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group, User
from django.core.exceptions import ValidationError
from django.db import connection, models
from django.db.models import Model as DjangoModel
from django.test import RequestFactory
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from apps.metering.models import UsageRecord
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import ApiKey, StaffToken, Tenant
from apps.tenancy.services import api_key_issue, api_key_verify, staff_token_issue, staff_token_verify, tenant_create

pytestmark = pytest.mark.django_db

REGISTERED = sorted(admin.site._registry, key=lambda m: m._meta.label)
RAW_KEY = re.compile(r"cl[ks]_[A-Za-z0-9]{48}")


def _celery_beat_factories() -> dict[str, Callable[[], DjangoModel]]:
    from django_celery_beat import models as beat

    def periodic_task() -> DjangoModel:
        interval = beat.IntervalSchedule.objects.create(every=5, period=beat.IntervalSchedule.MINUTES)
        return beat.PeriodicTask.objects.create(
            name="admin-page-test", task="celery.backend_cleanup", interval=interval
        )

    return {
        "django_celery_beat.IntervalSchedule": lambda: beat.IntervalSchedule.objects.create(
            every=10, period=beat.IntervalSchedule.SECONDS
        ),
        "django_celery_beat.CrontabSchedule": lambda: beat.CrontabSchedule.objects.create(minute="5"),
        "django_celery_beat.SolarSchedule": lambda: beat.SolarSchedule.objects.create(
            event="sunrise", latitude=48.85, longitude=2.35
        ),
        "django_celery_beat.ClockedSchedule": lambda: beat.ClockedSchedule.objects.create(
            clocked_time=timezone.now() + timedelta(days=1)
        ),
        "django_celery_beat.PeriodicTask": periodic_task,
    }


@pytest.fixture
def admin_objects(admin_user: User, tenant: Tenant, api_key, catalog_model, node) -> dict[str, Any]:
    """One instance of every model the project's fixtures can build, keyed by model label."""
    usage = make_usage(tenant=tenant, api_key=api_key[0], model=catalog_model, node=node)
    token, _ = staff_token_issue(user=admin_user, name="ci")
    Group.objects.create(name="operators")
    return {"usage": usage, "token": token}


def _launch_profile() -> DjangoModel:
    from apps.fleet.models import LaunchProfile

    return LaunchProfile.objects.create(name="aws-first", placements=[{"cloud": "aws", "region": "us-east-1"}])


def _factories() -> dict[str, Callable[[], DjangoModel]]:
    """Models the fixtures do not create and the generic builder cannot fill in validly."""
    return {
        **_celery_beat_factories(),
        "fleet.LaunchProfile": _launch_profile,
        "metering.StripeCustomer": _stripe_customer,
    }


def _stripe_customer() -> DjangoModel:
    from apps.metering.models import StripeCustomer

    return StripeCustomer.objects.create(tenant=tenant_create(slug="stripe-admin-test"), customer_id="cus_AdminTest1")


_SIMPLE_VALUES: list[tuple[type[models.Field], Any]] = [
    (models.EmailField, "admin-test@example.com"),
    (models.URLField, "http://127.0.0.1:9"),
    (models.SlugField, "admin-test"),
    (models.CharField, "admin-test"),
    (models.TextField, "admin test"),
    (models.BooleanField, False),
    (models.DecimalField, Decimal("1")),
    (models.FloatField, 1.0),
    (models.IntegerField, 1),
    (models.DateTimeField, None),  # filled with now() below
    (models.DateField, None),
]


def _generic_instance(model: type[DjangoModel]) -> DjangoModel:
    """Build a valid row from field types alone: required fields get simple values, FKs a related row."""
    values: dict[str, Any] = {}
    for field in model._meta.concrete_fields:
        if field.primary_key or field.has_default() or field.null or (field.blank and not field.is_relation):
            continue
        if field.is_relation:
            values[field.name] = _instance_of(field.related_model)
        elif field.choices:
            values[field.name] = field.choices[0][0]
        elif isinstance(field, models.DateTimeField):
            values[field.name] = timezone.now()
        elif isinstance(field, models.DateField):
            values[field.name] = timezone.now().date()
        else:
            value = next((v for kind, v in _SIMPLE_VALUES if isinstance(field, kind)), _MISSING)
            if value is _MISSING:
                pytest.fail(f"Cannot fill {model._meta.label}.{field.name}: add a factory to _factories().")
            values[field.name] = value[: field.max_length] if isinstance(value, str) and field.max_length else value
    instance = model(**values)
    try:
        instance.full_clean()
    except ValidationError as exc:
        pytest.fail(f"Cannot build a valid {model._meta.label} generically ({exc}): add a factory to _factories().")
    instance.save()
    return instance


_MISSING = object()


def _instance_of(model: type[DjangoModel]) -> DjangoModel:
    """An existing row (the fixtures made most), else one from a factory or the generic builder."""
    existing = model._default_manager.order_by("pk").first()
    if existing is not None:
        return existing
    factory = _factories().get(model._meta.label)
    return factory() if factory is not None else _generic_instance(model)


def _all_digests() -> list[str]:
    digests = list(ApiKey.objects.values_list("digest", flat=True))
    digests += list(StaffToken.objects.values_list("digest", flat=True))
    return [d for d in digests if d]


@pytest.mark.parametrize("model", REGISTERED, ids=[m._meta.label for m in REGISTERED])
def test_every_admin_page_renders_for_a_superuser(admin_client, admin_objects, model) -> None:
    model_admin = admin.site._registry[model]
    base = f"admin:{model._meta.app_label}_{model._meta.model_name}"
    obj = _instance_of(model)
    digests = _all_digests()
    request = RequestFactory().get("/admin/")
    request.user = User.objects.get(username="admin")

    urls = [reverse(f"{base}_changelist"), reverse(f"{base}_change", args=[obj.pk])]
    if model_admin.has_add_permission(request):
        urls.append(reverse(f"{base}_add"))
    for url in urls:
        response = admin_client.get(url)
        assert response.status_code == 200, f"{url} answered {response.status_code}"
        body = response.content.decode()
        for digest in digests:
            assert digest not in body, f"{url} renders a secret digest"


def test_admin_index_shows_the_platform_summary(admin_client, admin_objects, node) -> None:
    from django.core.cache import cache

    cache.clear()  # the usage totals are cached for a minute
    tenant_create(slug="paused", name="Paused")
    from apps.tenancy.services import tenant_suspend

    tenant_suspend(tenant=Tenant.objects.get(slug="paused"))
    body = admin_client.get(reverse("admin:index")).content.decode()
    assert "Platform summary" in body
    assert "Nodes: 1" in body
    assert re.search(r"Models(</a>)? \(active / total\)</th>\s*<td class=\"num\">1 / 1</td>", body)
    assert re.search(r"Tenants suspended(</a>)?</th>\s*<td class=\"num\">1</td>", body)
    assert re.search(r"Requests, last 24 h(</a>)?</th>\s*<td class=\"num\">1</td>", body)
    assert "42 (12 + 30)" in body  # the usage record's tokens


def test_admin_shows_a_new_api_key_exactly_once(admin_client, tenant) -> None:
    response = admin_client.post(
        reverse("admin:tenancy_apikey_add"),
        {
            "tenant": tenant.pk,
            "name": "from-admin",
            "scopes": ["inference", "usage:read"],
            "expires_at_0": "",
            "expires_at_1": "",
        },
        follow=True,
    )
    assert response.status_code == 200
    shown = RAW_KEY.findall(response.content.decode())
    assert len(shown) == 1, "the raw key must appear once, in the success message"
    key = api_key_verify(raw=shown[0])
    assert key is not None and key.name == "from-admin" and key.scopes == ["inference", "usage:read"]

    for url in (
        reverse("admin:tenancy_apikey_change", args=[key.pk]),
        reverse("admin:tenancy_apikey_changelist"),
        reverse("admin:tenancy_tenant_change", args=[tenant.pk]),
    ):
        body = admin_client.get(url).content.decode()
        assert shown[0] not in body
        assert key.digest not in body
        assert key.prefix in body


def test_admin_refuses_an_api_key_with_no_scope_as_a_form_error(admin_client, tenant) -> None:
    response = admin_client.post(
        reverse("admin:tenancy_apikey_add"),
        {"tenant": tenant.pk, "name": "x", "expires_at_0": "", "expires_at_1": ""},
    )
    assert response.status_code == 200
    assert response.context["adminform"].form.errors["scopes"]
    assert not ApiKey.objects.exists()


def test_admin_change_form_cannot_edit_prefix_digest_or_tenant(admin_client, api_key) -> None:
    key, raw = api_key
    other = tenant_create(slug="other", name="Other")
    url = reverse("admin:tenancy_apikey_change", args=[key.pk])
    form = admin_client.get(url).context["adminform"].form
    assert {"prefix", "digest", "tenant"}.isdisjoint(form.fields)
    response = admin_client.post(
        url,
        {
            "name": "renamed",
            "scopes": ["inference"],
            "tenant": other.pk,
            "prefix": "clk_hijacked",
            "digest": "0" * 64,
            "expires_at_0": "",
            "expires_at_1": "",
        },
    )
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.name == "renamed" and key.scopes == ["inference"]
    assert key.tenant_id != other.pk and key.prefix == raw[:12]
    assert api_key_verify(raw=raw) is not None


def test_admin_shows_a_new_staff_token_exactly_once(admin_client, admin_user) -> None:
    response = admin_client.post(
        reverse("admin:tenancy_stafftoken_add"),
        {"user": admin_user.pk, "name": "ci", "expires_at_0": "", "expires_at_1": ""},
        follow=True,
    )
    shown = RAW_KEY.findall(response.content.decode())
    assert len(shown) == 1
    token = staff_token_verify(raw=shown[0])
    assert token is not None and token.user == admin_user
    body = admin_client.get(reverse("admin:tenancy_stafftoken_change", args=[token.pk])).content.decode()
    assert shown[0] not in body and token.digest not in body


def test_admin_actions_call_the_services(admin_client, tenant, api_key) -> None:
    key, raw = api_key
    changelist = reverse("admin:tenancy_tenant_changelist")
    asked = admin_client.post(changelist, {"action": "suspend", "_selected_action": [tenant.pk]})
    assert asked.status_code == 200 and "Yes, suspend" in asked.content.decode()  # a confirmation first
    tenant.refresh_from_db()
    assert tenant.status == "active"
    admin_client.post(
        changelist, {"action": "suspend", "_selected_action": [tenant.pk], "confirm": "1", "reason": "unpaid invoice"}
    )
    tenant.refresh_from_db()
    assert tenant.status == "suspended" and tenant.status_reason == "unpaid invoice (staff:admin)"
    admin_client.post(changelist, {"action": "reactivate", "_selected_action": [tenant.pk]})
    tenant.refresh_from_db()
    assert tenant.status == "active"

    admin_client.post(
        reverse("admin:tenancy_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk], "confirm": "1", "reason": "leaked"},
    )
    assert api_key_verify(raw=raw) is None


def test_usage_records_are_read_only_in_the_admin(admin_client, admin_objects) -> None:
    usage = admin_objects["usage"]
    assert admin_client.get(reverse("admin:metering_usagerecord_add")).status_code == 403
    assert admin_client.get(reverse("admin:metering_usagerecord_delete", args=[usage.pk])).status_code == 403
    response = admin_client.post(reverse("admin:metering_usagerecord_change", args=[usage.pk]), {"prompt_tokens": 1})
    assert response.status_code == 403
    usage.refresh_from_db()
    assert usage.prompt_tokens == 12


# --- N+1: a changelist costs the same number of queries for 3 rows as for 30 ----------------


def _tenants(n: int) -> None:
    start = Tenant.objects.count()
    for i in range(start, start + n):
        tenant_create(slug=f"t{i}", name=f"T{i}")


def _keys(n: int) -> None:
    for i in range(n):
        api_key_issue(tenant=tenant_create(slug=f"k{ApiKey.objects.count()}-{i}"), name=f"k{i}")


def _tokens(n: int) -> None:
    for i in range(n):
        user = User.objects.create_user(f"staff{User.objects.count()}", is_staff=True)
        staff_token_issue(user=user, name=f"t{i}")


def _usage(n: int) -> None:
    from apps.catalog.services import model_create
    from apps.fleet.services import node_create

    for _ in range(n):
        i = UsageRecord.objects.count()
        tenant = tenant_create(slug=f"u{i}")
        key, _ = api_key_issue(tenant=tenant)
        model = model_create(name=f"m-{i}")
        make_usage(
            tenant=tenant,
            api_key=key,
            model=model,
            node=node_create(model=model, launcher="static", endpoint_url="http://127.0.0.1:9"),
        )


@pytest.mark.parametrize(
    ("url_name", "add_rows"),
    [
        ("admin:tenancy_tenant_changelist", _tenants),
        ("admin:tenancy_apikey_changelist", _keys),
        ("admin:tenancy_stafftoken_changelist", _tokens),
        ("admin:metering_usagerecord_changelist", _usage),
    ],
)
def test_changelist_query_count_does_not_grow_with_rows(admin_client, url_name, add_rows) -> None:
    url = reverse(url_name)
    add_rows(3)
    admin_client.get(url)  # warm the session and content-type caches
    with CaptureQueriesContext(connection) as few:
        assert admin_client.get(url).status_code == 200
    add_rows(27)
    with CaptureQueriesContext(connection) as many:
        response = admin_client.get(url)
    assert len(response.context["cl"].result_list) == 30
    assert len(many) == len(few), "\n".join(q["sql"] for q in many.captured_queries)
    # Sidebar filters must not scan the table for their choices.
    assert not [q["sql"] for q in many.captured_queries if "DISTINCT" in q["sql"].upper()]


def test_generic_builder_makes_valid_rows_for_models_without_a_factory(db) -> None:
    group = _generic_instance(Group)
    tenant = _generic_instance(Tenant)
    assert Group.objects.filter(pk=group.pk).exists()
    assert isinstance(tenant, Tenant) and tenant.slug == "admin-test"


def test_staff_without_superuser_only_issue_and_see_their_own_staff_tokens(client, admin_user) -> None:
    from django.contrib.auth.models import Permission

    operator = User.objects.create_user("operator", is_staff=True)
    operator.user_permissions.set(Permission.objects.filter(codename__endswith="_stafftoken"))
    client.force_login(operator)
    theirs, _ = staff_token_issue(user=admin_user, name="root-token")
    assert client.get(reverse("admin:tenancy_stafftoken_change", args=[theirs.pk])).status_code == 302
    assert "root-token" not in client.get(reverse("admin:tenancy_stafftoken_changelist")).content.decode()

    response = client.post(
        reverse("admin:tenancy_stafftoken_add"),
        {"user": admin_user.pk, "name": "escalate", "expires_at_0": "", "expires_at_1": ""},
    )
    assert response.status_code == 200 and response.context["adminform"].form.errors["user"]
    assert not StaffToken.objects.filter(name="escalate").exists()


def _hierarchy_choices(body: str, param: str) -> set[str]:
    """The values of ``param`` the date hierarchy links to (its links only, not the sidebar's)."""
    from html import unescape
    from urllib.parse import parse_qs, urlparse

    start = body.index('<nav class="toplinks">')
    nav = body[start : body.index("</nav>", start)]
    links = [parse_qs(urlparse(unescape(href)).query) for href in re.findall(r'href="([^"]*)"', nav)]
    return {q[param][0] for q in links if param in q}


def test_usage_date_hierarchy_lists_only_periods_with_rows_without_scanning_rows(admin_client, tenant) -> None:
    from datetime import UTC, datetime

    for moment in (
        datetime(2023, 6, 1, 12, tzinfo=UTC),
        datetime(2025, 3, 9, 12, tzinfo=UTC),
        datetime(2025, 3, 30, 23, 59, tzinfo=UTC),
        datetime(2025, 7, 4, 0, 0, tzinfo=UTC),
    ):
        make_usage(tenant=tenant, created_at=moment)
    url = reverse("admin:metering_usagerecord_changelist")
    pages = {  # query → the parameter its links set, and exactly the values offered (no empty periods)
        "": ("created_at__year", {"2023", "2025"}),
        "?created_at__year=2025": ("created_at__month", {"3", "7"}),
        "?created_at__year=2025&created_at__month=3": ("created_at__day", {"9", "30"}),
    }
    for query, (param, offered) in pages.items():
        with CaptureQueriesContext(connection) as queries:
            response = admin_client.get(url + query)
        assert response.status_code == 200
        assert _hierarchy_choices(response.content.decode(), param) == offered, query
        # Index probes (EXISTS per period, MIN/MAX), never a SELECT DISTINCT over the rows.
        assert not [q["sql"] for q in queries.captured_queries if "DISTINCT" in q["sql"].upper()]
    day = admin_client.get(url + "?created_at__year=2025&created_at__month=3&created_at__day=9")
    assert "March 9" in day.content.decode() and len(day.context["cl"].result_list) == 1


def test_usage_date_hierarchy_follows_the_list_filter(admin_client, tenant) -> None:
    from datetime import UTC, datetime

    make_usage(tenant=tenant, created_at=datetime(2025, 3, 9, 12, tzinfo=UTC), status_code=200)
    make_usage(tenant=tenant, created_at=datetime(2025, 5, 9, 12, tzinfo=UTC), status_code=500)
    body = admin_client.get(
        reverse("admin:metering_usagerecord_changelist") + "?status_class=5xx&created_at__year=2025"
    ).content.decode()
    assert _hierarchy_choices(body, "created_at__month") == {"5"}


def test_admin_creates_and_edits_tenants_through_the_services(admin_client, tenant) -> None:
    limits = {
        "requests_per_minute": 60,
        "tokens_per_minute": 1000,
        "max_concurrent_requests": 2,
        "monthly_token_budget": "",
    }
    response = admin_client.post(
        reverse("admin:tenancy_tenant_add"),
        {
            "slug": "globex",
            "name": "Globex",
            "contact_email": "ops@globex.test",
            **limits,
            "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 302, response.context["adminform"].form.errors
    globex = Tenant.objects.get(slug="globex")
    assert (globex.requests_per_minute, globex.monthly_token_budget) == (60, None)

    duplicate = admin_client.post(
        reverse("admin:tenancy_tenant_add"),
        {"slug": "acme", "name": "Again", **limits, "api_keys-TOTAL_FORMS": 0, "api_keys-INITIAL_FORMS": 0},
    )
    assert duplicate.status_code == 200 and duplicate.context["adminform"].form.errors["slug"]

    response = admin_client.post(
        reverse("admin:tenancy_tenant_change", args=[globex.pk]),
        {
            "slug": "globex",
            "name": "Globex Inc",
            "contact_email": "",
            **limits,
            "api_keys-TOTAL_FORMS": 0,
            "api_keys-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 302
    globex.refresh_from_db()
    assert globex.name == "Globex Inc"


def test_tenant_page_links_to_issuing_a_prefilled_key(admin_client, tenant, api_key) -> None:
    body = admin_client.get(reverse("admin:tenancy_tenant_change", args=[tenant.pk])).content.decode()
    add_url = reverse("admin:tenancy_apikey_add") + f"?tenant={tenant.pk}"
    assert add_url in body and api_key[0].prefix in body  # the read-only key inline lists it
    form = admin_client.get(add_url).context["adminform"].form
    assert form.initial["tenant"] == str(tenant.pk)
    listing = admin_client.get(reverse("admin:tenancy_apikey_changelist") + f"?tenant__id__exact={tenant.pk}")
    assert [k.pk for k in listing.context["cl"].result_list] == [api_key[0].pk]
