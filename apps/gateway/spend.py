"""Money on the gateway's request path: which monthly budgets a request is charged to, its
worst-case cost (the reservation), its real cost (the settlement and the usage record), and what
a refused customer is told. The limiter (apps.gateway.limits) does the counting in Redis."""

from __future__ import annotations

from typing import Any

from django.db import close_old_connections, connection

from apps.gateway import relay
from apps.gateway.auth import KeyEntry
from apps.gateway.limits import MICROS, TOKENS, Budget, month_of
from apps.gateway.routing import ModelRoute
from apps.metering.services import cost_micros


def request_budgets(
    entry: KeyEntry, route: ModelRoute, payload: dict, reserve: int, body_len: int
) -> tuple[list[Budget], int]:
    """The request's monthly budgets, and its worst-case cost in micro-dollars: the prompt
    estimate at the input price plus every output token it may ask for at the output price,
    each clamped to the model's context length (vLLM refuses beyond it)."""
    month = month_of()
    budgets: list[Budget] = []
    if entry.monthly_token_budget is not None:
        budgets.append(Budget.monthly(tenant_id=entry.tenant_id, limit=entry.monthly_token_budget, month=month))
    if entry.tenant_spend_limit_micros is None and entry.key_spend_limit_micros is None:
        return budgets, 0
    prompt = body_len // 4
    output = max(0, reserve - prompt)
    if route.max_model_len:
        prompt = min(prompt, route.max_model_len)
        output = min(output, route.max_model_len * max(1, int(payload.get("n") or 1)))
    worst = cost_micros(
        prompt_tokens=prompt, completion_tokens=output, price_in=route.price_in, price_out=route.price_out
    )
    if entry.tenant_spend_limit_micros is not None:
        budgets.append(
            Budget.dollars(owner=f"tenant:{entry.tenant_id}", limit_micros=entry.tenant_spend_limit_micros, month=month)
        )
    if entry.key_spend_limit_micros is not None:
        budgets.append(
            Budget.dollars(owner=f"key:{entry.key_id}", limit_micros=entry.key_spend_limit_micros, month=month)
        )
    return budgets, worst


def billed(ex: relay.Exchange, route: Any) -> tuple[int, int, bool, int]:
    """(prompt, completion, estimated, cost in micro-dollars): what the usage record says and
    what the budgets are charged, the same numbers for both. No node reached: nothing used."""
    if ex.node_id is None:
        return 0, 0, False, 0
    prompt, completion, estimated = ex.tokens()
    cost = cost_micros(
        prompt_tokens=prompt, completion_tokens=completion, price_in=route.price_in, price_out=route.price_out
    )
    return prompt, completion, estimated, cost


def _dollars(micros: int) -> str:
    return f"${micros / 1_000_000:,.2f}"


def refusal(budget: Budget | None) -> tuple[str, str]:
    """(metrics label, OpenAI-style message) for a spent budget."""
    if budget is None or budget.unit == TOKENS:
        return "tenant_tokens", "You exceeded your monthly token budget; contact us to raise it."
    assert budget.unit == MICROS
    if budget.owner.startswith("key:"):
        return (
            "key_dollars",
            f"This API key reached its monthly spend limit ({_dollars(budget.limit)}); "
            "ask your account's administrator to raise it, or wait for the next month.",
        )
    return (
        "tenant_dollars",
        f"You exceeded your current quota: your account's monthly spend limit ({_dollars(budget.limit)}) "
        "is reached; contact us to raise it.",
    )


def month_usage(owner: str, month: str, unit: str) -> int:
    from apps.metering.selectors import owner_month_usage

    close_old_connections()
    try:
        return owner_month_usage(owner=owner, month=month, unit=unit)
    finally:
        connection.close()  # the gateway keeps no connection between lookups
