"""Per-node secrets. A node's vLLM API key is derived, not stored: HMAC of a server secret and
the node id. The gateway presents it to the node; customers never see it."""

from __future__ import annotations

import hashlib
import hmac

from django.conf import settings


def node_api_key(node_id: int) -> str:
    mac = hmac.new(settings.NODE_KEY_SECRET.encode(), f"vllm-node:{node_id}".encode(), hashlib.sha256)
    return "vk-" + mac.hexdigest()
