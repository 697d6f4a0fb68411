"""create_tenant, create_api_key, create_staff_token and bootstrap_demo: success and bad input."""

from __future__ import annotations

from io import StringIO

import pytest
from django.contrib.auth.models import User
from django.core.management import call_command
from django.core.management.base import CommandError

from apps.catalog.models import ServedModel
from apps.tenancy.models import ApiKey, Tenant
from apps.tenancy.services import api_key_verify, staff_token_verify

pytestmark = pytest.mark.django_db


def run(*args: str, **options: object) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command(*args, stdout=out, stderr=err, **options)
    return out.getvalue(), err.getvalue()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


# --- create_tenant --------------------------------------------------------------------------


def test_create_tenant_with_name_email_and_limits() -> None:
    out, _ = run(
        "create_tenant",
        "globex",
        "--name",
        "Globex",
        "--email",
        "ops@globex.test",
        "--rpm",
        "5",
        "--monthly-budget",
        "1000",
    )
    tenant = Tenant.objects.get(slug="globex")
    assert (tenant.name, tenant.contact_email, tenant.requests_per_minute, tenant.monthly_token_budget) == (
        "Globex",
        "ops@globex.test",
        5,
        1000,
    )
    assert "Created tenant globex" in out


def test_create_tenant_with_a_spend_limit_in_dollars() -> None:
    out, _ = run("create_tenant", "initech", "--spend-limit", "25.5")

    assert Tenant.objects.get(slug="initech").monthly_spend_limit_micros == 25_500_000
    assert "monthly spend limit $25.50" in out


@pytest.mark.parametrize("amount", ["-1", "abc", "NaN"])
def test_create_tenant_refuses_a_spend_limit_that_is_not_dollars(amount: str) -> None:
    with pytest.raises(CommandError, match="not an amount of US dollars"):
        run("create_tenant", "initech", "--spend-limit", amount)
    assert not Tenant.objects.filter(slug="initech").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["acme"], "slug"),  # duplicate of the fixture's tenant
        (["new-one", "--email", "not-an-email"], "contact_email"),
        (["has space"], "slug"),
        (["new-two", "--rpm", "0"], "requests_per_minute"),
    ],
)
def test_create_tenant_refuses_bad_input(tenant, args, message) -> None:
    with pytest.raises(CommandError, match=message):
        run("create_tenant", *args)
    assert Tenant.objects.count() == 1


# --- create_api_key -------------------------------------------------------------------------


def test_create_api_key_prints_a_working_key_as_the_last_line(tenant, catalog_model) -> None:
    out, _ = run(
        "create_api_key",
        "--tenant",
        "acme",
        "--name",
        "ci",
        "--scopes",
        "inference,usage:read",
        "--models",
        catalog_model.name,
        "--expires-days",
        "30",
        "--rpm",
        "7",
    )
    key = api_key_verify(raw=last_line(out))
    assert key is not None and key.tenant == tenant and key.name == "ci"
    assert key.scopes == ["inference", "usage:read"] and key.allowed_models == [catalog_model.name]
    assert key.expires_at is not None and key.requests_per_minute == 7


def test_create_api_key_defaults_to_inference_scope(tenant) -> None:
    out, _ = run("create_api_key", "--tenant", "acme")
    assert api_key_verify(raw=last_line(out)).scopes == ["inference"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tenant", "nope"], "No tenant 'nope'"),
        (["--tenant", "acme", "--scopes", "inference,admin"], "scopes: Unknown scope"),
        (["--tenant", "acme", "--scopes", ""], "scopes"),
        (["--tenant", "acme", "--models", "no-such-model"], "allowed_models"),
        (["--tenant", "acme", "--expires-days", "0"], "expires-days"),
    ],
)
def test_create_api_key_refuses_bad_input(tenant, args, message) -> None:
    with pytest.raises(CommandError, match=message):
        run("create_api_key", *args)
    assert not ApiKey.objects.exists()


def test_create_api_key_requires_a_tenant() -> None:
    with pytest.raises(CommandError, match="--tenant"):
        run("create_api_key")


# --- create_staff_token ---------------------------------------------------------------------


def test_create_staff_token_prints_a_working_token(db) -> None:
    user = User.objects.create_user("alice", is_staff=True)
    out, _ = run("create_staff_token", "--user", "alice", "--name", "deploy")
    token = staff_token_verify(raw=last_line(out))
    assert token is not None and token.user == user and token.name == "deploy"


def test_create_staff_token_refuses_unknown_and_non_staff_users(db) -> None:
    User.objects.create_user("bob", is_staff=False)
    with pytest.raises(CommandError, match="No user 'carol'"):
        run("create_staff_token", "--user", "carol")
    with pytest.raises(CommandError, match="user: Only staff"):
        run("create_staff_token", "--user", "bob")


# --- bootstrap_demo -------------------------------------------------------------------------


@pytest.fixture
def superuser_env(monkeypatch):
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "root")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "s3cret-Passw0rd")
    monkeypatch.setenv("DJANGO_SUPERUSER_EMAIL", "root@example.com")


def test_bootstrap_demo_creates_everything_then_is_idempotent(superuser_env) -> None:
    out, _ = run("bootstrap_demo")
    user = User.objects.get(username="root")
    assert user.is_superuser and user.check_password("s3cret-Passw0rd")
    assert Tenant.objects.filter(slug="demo").exists() and ServedModel.objects.filter(name="demo-llama").exists()
    key = api_key_verify(raw=last_line(out))
    assert key is not None and key.tenant.slug == "demo" and "s3cret" not in out

    out2, _ = run("bootstrap_demo")
    assert f"{key.prefix}… exists" in out2 and "--new-key" in out2
    counts = (User.objects.count(), Tenant.objects.count(), ServedModel.objects.count(), ApiKey.objects.count())
    assert counts == (1, 1, 1, 1)
    assert api_key_verify(raw=last_line(out2)) is None  # no key printed again


def test_bootstrap_demo_new_key_issues_another_key(superuser_env) -> None:
    run("bootstrap_demo")
    out, _ = run("bootstrap_demo", "--new-key")
    assert api_key_verify(raw=last_line(out)) is not None
    assert ApiKey.objects.count() == 2


def test_bootstrap_demo_issues_a_key_when_the_old_one_was_revoked(superuser_env) -> None:
    from apps.tenancy.services import api_key_revoke

    run("bootstrap_demo")
    api_key_revoke(key=ApiKey.objects.get())
    out, _ = run("bootstrap_demo")
    assert api_key_verify(raw=last_line(out)) is not None


def test_bootstrap_demo_uses_admin_admin_only_in_debug_and_warns(settings, monkeypatch) -> None:
    for name in ("DJANGO_SUPERUSER_USERNAME", "DJANGO_SUPERUSER_PASSWORD", "DJANGO_SUPERUSER_EMAIL"):
        monkeypatch.delenv(name, raising=False)
    settings.DEBUG = False
    with pytest.raises(CommandError, match="DJANGO_SUPERUSER_USERNAME"):
        run("bootstrap_demo")
    assert not User.objects.exists() and not Tenant.objects.exists()

    settings.DEBUG = True
    _, err = run("bootstrap_demo")
    assert "WARNING" in err and "admin/admin" in err
    assert User.objects.get(username="admin").check_password("admin")


def test_bootstrap_demo_refuses_a_username_without_password(monkeypatch, db) -> None:
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "root")
    monkeypatch.delenv("DJANGO_SUPERUSER_PASSWORD", raising=False)
    with pytest.raises(CommandError, match="DJANGO_SUPERUSER_PASSWORD"):
        run("bootstrap_demo")


def test_bootstrap_demo_in_development_launches_one_local_demo_node(settings, monkeypatch, db) -> None:
    from apps.fleet.models import Node

    settings.DEBUG = True
    settings.FLEET_DEFAULT_LAUNCHER = "local"
    monkeypatch.delenv("DJANGO_SUPERUSER_USERNAME", raising=False)
    call_command("bootstrap_demo", stdout=StringIO(), stderr=StringIO())
    node = Node.objects.get()
    assert node.launcher == "local" and node.model.name == "demo-llama" and node.status == "pending"
    assert node.model.min_replicas == 1  # the reconciler keeps it there
    out = StringIO()
    call_command("bootstrap_demo", stdout=out, stderr=StringIO())
    assert Node.objects.count() == 1 and "already has a live node" in out.getvalue()


def test_bootstrap_demo_launches_nothing_outside_development(superuser_env) -> None:
    from apps.fleet.models import Node

    call_command("bootstrap_demo", stdout=StringIO())
    assert not Node.objects.exists()


def test_stop_local_nodes_terminates_local_nodes_only(catalog_model) -> None:
    from apps.fleet.models import Node
    from apps.fleet.services import node_create

    local = node_create(model=catalog_model, launcher="local")
    static = node_create(model=catalog_model, launcher="static", endpoint_url="http://127.0.0.1:9")
    out = StringIO()
    call_command("stop_local_nodes", stdout=out)
    assert Node.objects.get(pk=local.pk).status == "terminated"
    assert Node.objects.get(pk=static.pk).status == "pending"
    assert "stopped 1 local node(s)" in out.getvalue()
