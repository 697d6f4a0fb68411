"""Monthly budgets the rate limiter enforces (apps/gateway/limits.py): a tenant's tokens, and a
tenant's or a key's micro-dollars (US$ 1e-6), each a counter in Redis per calendar month (UTC)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

TOKENS, MICROS = "tokens", "micros"  # the units a budget counts


def month_of(now: float | None = None) -> str:
    """The calendar month (UTC) a counter belongs to: "2026-11"."""
    return time.strftime("%Y-%m", time.gmtime(now))


@dataclass(frozen=True, slots=True)
class Budget:
    """A monthly counter with a limit: a tenant's tokens, or a tenant's or a key's micro-dollars.

    ``owner`` ("tenant:3", "key:12") and ``month`` say what the seeder must sum when Redis has
    no counter; ``unit`` says which reservation and which usage the counter is charged with."""

    key: str
    limit: int
    unit: str = TOKENS
    owner: str = ""
    month: str = ""

    @classmethod
    def monthly(
        cls,
        *,
        tenant_id: int,
        limit: int,
        prefix: str = "crosslogic:budget:",
        now: float | None = None,
        month: str | None = None,
    ) -> Budget:
        """A tenant's token budget (the key format predates the dollar budgets and is kept)."""
        month = month or month_of(now)
        return cls(
            key=f"{prefix}{tenant_id}:{month}",
            limit=max(0, int(limit)),
            unit=TOKENS,
            owner=f"tenant:{tenant_id}",
            month=month,
        )

    @classmethod
    def dollars(
        cls,
        *,
        owner: str,
        limit_micros: int,
        prefix: str = "crosslogic:budget:usd:",
        now: float | None = None,
        month: str | None = None,
    ) -> Budget:
        """A monthly spend limit in micro-dollars of ``owner`` ("tenant:<id>" or "key:<id>")."""
        month = month or month_of(now)
        return cls(
            key=f"{prefix}{owner}:{month}", limit=max(0, int(limit_micros)), unit=MICROS, owner=owner, month=month
        )


# What the limiter calls for a counter Redis does not have: the month's usage so far, in the
# budget's unit. May raise; the limiter then admits without that budget for this request.
Seeder = Callable[[Budget], Awaitable[int]]
