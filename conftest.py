"""Project-wide fixtures. Tests run against a real PostgreSQL and a real Redis (see Makefile)."""

from __future__ import annotations

import pytest
from django.conf import settings


def pytest_configure(config: pytest.Config) -> None:
    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine and not config.getoption("--allow-sqlite", default=False):
        raise pytest.UsageError(
            "The suite runs against PostgreSQL: set DATABASE_URL=postgres://… or use `make test`, "
            "which finds or starts one."
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--allow-sqlite", action="store_true", help="Run against SQLite (not for CI).")


@pytest.fixture(autouse=True)
def _fresh_throttles():
    """Throttle counters live in the shared cache (Redis): no test inherits another's attempts."""
    from apps.core import redis as redis_lib

    client = redis_lib.client()
    if client is not None:
        for key in client.scan_iter("crosslogic:*:throttle_*"):
            client.delete(key)
    yield


@pytest.fixture
def tenant(db):
    from apps.tenancy.services import tenant_create

    return tenant_create(slug="acme", name="Acme Corp", contact_email="ops@acme.test")


@pytest.fixture
def catalog_model(db):
    from apps.catalog.services import model_create

    return model_create(name="llama-3-8b", hf_repo="meta-llama/Meta-Llama-3-8B-Instruct",
                        storage_uri="s3://weights/llama-3-8b")


@pytest.fixture
def api_key(tenant):
    """(ApiKey, raw key) with every scope."""
    from apps.tenancy.services import api_key_issue

    return api_key_issue(tenant=tenant, name="test", scopes=["inference", "usage:read", "keys:manage"])


@pytest.fixture
def node(catalog_model):
    from apps.fleet.services import node_create

    return node_create(model=catalog_model, launcher="static", endpoint_url="http://127.0.0.1:9")


@pytest.fixture
def redis_db():
    """The test Redis database, emptied before and after the test."""
    from apps.core import redis as redis_lib

    client = redis_lib.client()
    if client is None:
        pytest.fail("REDIS_URL is not set; `make test` sets it.")
    client.flushdb()
    yield client
    client.flushdb()
