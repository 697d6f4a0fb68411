"""The one module that calls tenants' own HTTP endpoints (budget alert webhooks): httpx, a short
timeout from settings, no redirects followed, and never an exception to the caller."""

from __future__ import annotations

import json
from typing import Any

import httpx
from django.conf import settings


def post_json(*, url: str, payload: dict[str, Any], event_id: str) -> str:
    """POST ``payload`` as JSON; the outcome in a few words ("HTTP 200", "failed: ConnectTimeout")."""
    try:
        response = httpx.post(
            url,
            content=json.dumps(payload).encode(),
            headers={
                "content-type": "application/json",
                "user-agent": "CrossLogic-Webhooks/1",
                "x-crosslogic-event": str(payload.get("type", "")),
                "x-crosslogic-event-id": event_id,  # the same id on a retry: receivers can de-duplicate
            },
            timeout=settings.BUDGET_WEBHOOK_TIMEOUT_S,
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        return f"failed: {type(exc).__name__}"[:200]
    return f"HTTP {response.status_code}"
