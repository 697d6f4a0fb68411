"""Secret tokens shown once and stored only as peppered HMAC-SHA256 digests.

Used for customer API keys (``clk_``), staff API tokens (``cls_``) and node registration
tokens. A token is ``<prefix><8 lookup chars><secret>``: the first part is stored in clear for
an indexed lookup and display, the whole token only as a digest.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string

from django.conf import settings

LOOKUP_LEN = 8
SECRET_LEN = 40
_ALPHABET = string.ascii_letters + string.digits


def _random(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


def digest(raw: str) -> str:
    return hmac.new(settings.API_KEY_PEPPER.encode(), raw.encode(), hashlib.sha256).hexdigest()


def new_token(kind_prefix: str) -> tuple[str, str, str]:
    """Return (raw token, visible prefix, digest)."""
    visible = kind_prefix + _random(LOOKUP_LEN)
    raw = visible + _random(SECRET_LEN)
    return raw, visible, digest(raw)


def split_prefix(raw: str, kind_prefix: str) -> str | None:
    """The lookup prefix of a well-formed token, or None when it cannot be one of ours."""
    if not raw.startswith(kind_prefix) or len(raw) != len(kind_prefix) + LOOKUP_LEN + SECRET_LEN:
        return None
    return raw[: len(kind_prefix) + LOOKUP_LEN]


def matches(raw: str, stored_digest: str) -> bool:
    return hmac.compare_digest(digest(raw), stored_digest)
