"""Per-node secrets. A node launched by us calls home once with a one-time registration token
(we keep only its digest). A node's vLLM API key is derived, not stored: HMAC of a server secret and
the node id. The gateway presents it to the node; customers never see it.

A static node (``add_node``) brings a key of its own, which the gateway must present as is, so it
has to be stored: it is kept sealed (Fernet, with a key derived from NODE_KEY_SECRET), never in
clear, so a database dump or a staff member reading ``launcher_state`` does not get it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken
from django.conf import settings

from apps.core.secrets import new_token

log = logging.getLogger(__name__)

SEALED_STATIC_KEY = "static_api_key_sealed"
REGISTRATION_TOKEN_PREFIX = "clr_"  # noqa: S105 - a public prefix, not a secret


def registration_token_issue() -> tuple[str, str]:
    """(raw token for the node, digest we keep)."""
    raw, _visible, token_hash = new_token(REGISTRATION_TOKEN_PREFIX)
    return raw, token_hash


def node_api_key(node_id: int) -> str:
    mac = hmac.new(settings.NODE_KEY_SECRET.encode(), f"vllm-node:{node_id}".encode(), hashlib.sha256)
    return "vk-" + mac.hexdigest()


@lru_cache(maxsize=4)
def _fernet(secret: str) -> Fernet:
    key = hmac.new(secret.encode(), b"crosslogic:static-node-key", hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def seal_static_key(api_key: str) -> str:
    return _fernet(settings.NODE_KEY_SECRET).encrypt(api_key.encode()).decode()


def static_key(node_id: int, state: dict) -> str | None:
    """The key a static node expects, or None if it has none (or it cannot be unsealed)."""
    sealed = state.get(SEALED_STATIC_KEY)
    if not sealed:
        return None
    try:
        return _fernet(settings.NODE_KEY_SECRET).decrypt(str(sealed).encode()).decode()
    except InvalidToken:
        log.error(
            "node %s: its static API key cannot be unsealed (NODE_KEY_SECRET changed?); "
            "register it again with add_node",
            node_id,
        )
        return None


def presented_key(node_id: int, launcher: str, state: dict) -> str:
    """What the gateway sends a node as ``Authorization: Bearer``."""
    return (static_key(node_id, state) if launcher == "static" else None) or node_api_key(node_id)
