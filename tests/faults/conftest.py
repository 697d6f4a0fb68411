"""Session-wide throwaway PostgreSQL and Redis for the fault suite (servers.py): the tests stop,
kill and restart them, which the machine's shared servers must never be."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.deployment import migrate_template
from tests.faults.servers import ServerUnavailableError, ThrowawayPostgres, ThrowawayRedis


@pytest.fixture(scope="session")
def throwaway_pg() -> Iterator[ThrowawayPostgres]:
    try:
        pg = ThrowawayPostgres()
    except ServerUnavailableError as exc:
        pytest.skip(f"fault suite: {exc} (see scripts/services.sh)")
    with pg:
        migrate_template(pg)
        yield pg


@pytest.fixture(scope="session")
def throwaway_redis() -> Iterator[ThrowawayRedis]:
    try:
        server = ThrowawayRedis()
    except ServerUnavailableError as exc:
        pytest.skip(f"fault suite: {exc} (see scripts/services.sh)")
    with server:
        yield server


# The catalog's R2 fixtures (moto behind the R2-faithful front), for the worker-killed upload.
from apps.catalog.tests.conftest import moto_endpoint, r2, r2_front, r2_front_server  # noqa: E402, F401
