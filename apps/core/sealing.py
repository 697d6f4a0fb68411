"""Secrets we must be able to read back (a tenant's webhook signing secret: the receiver verifies
with the same value, so a digest will not do) are kept sealed: Fernet, with a key derived from a
server secret and the purpose, so a database dump or a staff member browsing rows never sees one in
clear, and one purpose's sealed values cannot be unsealed as another's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken


@lru_cache(maxsize=8)
def _fernet(server_secret: str, purpose: str) -> Fernet:
    key = hmac.new(server_secret.encode(), f"crosslogic:sealed:{purpose}".encode(), hashlib.sha256).digest()
    return Fernet(base64.urlsafe_b64encode(key))


def seal(value: str, *, server_secret: str, purpose: str) -> str:
    return _fernet(server_secret, purpose).encrypt(value.encode()).decode()


def unseal(sealed: str, *, server_secret: str, purpose: str) -> str | None:
    """The value, or None when it cannot be unsealed (the server secret changed, or not ours)."""
    try:
        return _fernet(server_secret, purpose).decrypt(sealed.encode()).decode()
    except (InvalidToken, ValueError):
        return None
