"""Static nodes added by hand: a vLLM server that already runs (on-prem, or the simulator) becomes a
``static`` node after one probe (``manage.py add_node`` calls static_node_add).

The probe is the health checker's own (``health.check_targets``: GET /health, then /metrics), so
a node that add_node calls healthy is one the periodic check agrees with; then GET /v1/models the
way the gateway will call it, to check the key and the served model name before routing to it.
"""

from __future__ import annotations

import asyncio
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet import health
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create, node_transition

ACTOR = "add_node"


def static_endpoint(raw: str) -> str:
    """The base URL the gateway appends ``/v1/...`` to; an SDK-style ``…/v1`` is accepted too."""
    url = raw.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    try:
        URLValidator(schemes=["http", "https"])(url)
    except ValidationError:
        raise ValidationError(f"{raw!r} is not an http(s) URL, e.g. http://10.0.0.5:8000") from None
    if not urlsplit(url).hostname:
        raise ValidationError(f"{raw!r} has no host")
    return url


async def _served_models_problem(
    session: aiohttp.ClientSession, endpoint: str, *, served_name: str, api_key: str | None
) -> str:
    """GET {endpoint}/v1/models as the gateway will call it: "" when it serves ``served_name``, else why not."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with session.get(endpoint + "/v1/models", headers=headers, allow_redirects=False) as response:
            status = response.status
            body: Any = await response.json(content_type=None) if status == 200 else None
    except TimeoutError:
        return "GET /v1/models did not answer in time"
    except (aiohttp.ClientError, ValueError) as exc:
        return f"GET /v1/models failed: {type(exc).__name__}: {exc}"[:300]
    if status == 401:
        return "the server refused the API key" if api_key else "the server requires an API key (--api-key)"
    if status != 200:
        return f"GET /v1/models answered HTTP {status}"
    try:
        served = [card["id"] for card in body["data"]]
    except (KeyError, TypeError):
        return "GET /v1/models did not answer a model list"
    if served_name not in served:
        return f"the server serves {', '.join(map(str, served)) or 'no model'}, not {served_name}"
    return ""


async def _probe(
    node_id: int, endpoint: str, *, served_name: str, api_key: str | None, timeout_s: float
) -> health.Result:
    (result,) = await health.check_targets([health.Target(node_id, endpoint)], limit_s=timeout_s, concurrency=1)
    if not result.ok:
        return health.Result(node_id, False, result.latency_ms, error=f"health probe failed: {result.error}")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s), trust_env=False) as session:
        problem = await _served_models_problem(session, endpoint, served_name=served_name, api_key=api_key)
    return health.Result(node_id, not problem, result.latency_ms, result.load, error=problem)


def static_node_add(
    *, model: ServedModel, endpoint_url: str, api_key: str | None = None, timeout_s: float = 5.0, actor: str = ACTOR
) -> Node:
    """Register the server at ``endpoint_url`` as a static node for ``model``, probe it once, and
    leave it ``ready`` (its key kept sealed for the gateway) or ``failed`` with the reason.

    Raises ValidationError for a bad URL or timeout (nothing is created then), and
    IllegalTransition if someone else moved the node while it was probed.
    """
    endpoint = static_endpoint(endpoint_url)
    if not timeout_s > 0:
        raise ValidationError("The probe timeout must be positive.")
    node = node_create(model=model, launcher="static", endpoint_url=endpoint, actor=actor)
    result = asyncio.run(
        _probe(node.pk, endpoint, served_name=model.name, api_key=api_key or None, timeout_s=timeout_s)
    )
    latency = round(result.latency_ms, 2) if result.latency_ms is not None else None
    fields: dict[str, object] = {"last_health_at": timezone.now(), "health_latency_ms": latency}
    if result.ok:
        state = dict(node.launcher_state)
        if api_key:
            state[SEALED_STATIC_KEY] = seal_static_key(api_key)
        return node_transition(
            node=node,
            to=NodeStatus.READY,
            reason="health probe succeeded",
            actor=actor,
            expected_from=NodeStatus.PENDING,
            launcher_state=state,
            **fields,
        )
    return node_transition(
        node=node,
        to=NodeStatus.FAILED,
        reason=result.error,
        actor=actor,
        expected_from=NodeStatus.PENDING,
        consecutive_failures=1,
        **fields,
    )
