"""Bearer authentication for the management API.

``Authorization: Bearer cls_…`` is a staff token (acts as its user); ``Bearer clk_…`` is a
customer API key, which acts as a CustomerPrincipal confined to its own tenant.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from apps.tenancy import services
from apps.tenancy.models import ApiKey, Tenant


@dataclass(frozen=True)
class CustomerPrincipal:
    """request.user for a customer API key: authenticated, never staff, one tenant."""

    api_key: ApiKey

    is_authenticated = True
    is_anonymous = False
    is_staff = False
    is_superuser = False
    is_active = True

    @property
    def tenant(self) -> Tenant:
        return self.api_key.tenant

    @property
    def pk(self) -> int:  # DRF's throttles and logging look for a pk
        return -self.api_key.pk

    def __str__(self) -> str:
        return f"key {self.api_key.prefix}"


class BearerKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[object, object] | None:
        header = authentication.get_authorization_header(request).decode("latin-1")
        if not header:
            return None
        parts = header.split()
        if len(parts) != 2 or parts[0] != self.keyword:
            raise exceptions.AuthenticationFailed("Use 'Authorization: Bearer <token>'.")
        raw = parts[1]
        if raw.startswith(services.STAFF_TOKEN_PREFIX):
            token = services.staff_token_verify(raw=raw)
            if token is None:
                raise exceptions.AuthenticationFailed("Invalid, expired or revoked staff token.")
            services.staff_token_touch(token=token)
            return token.user, token
        if raw.startswith(settings.API_KEY_PREFIX):
            key = services.api_key_verify(raw=raw)
            if key is None or not key.tenant.is_active:
                raise exceptions.AuthenticationFailed("Invalid, expired or revoked API key, or suspended tenant.")
            services.api_key_touch(key=key)
            return CustomerPrincipal(api_key=key), key
        raise exceptions.AuthenticationFailed("Unrecognised token.")

    def authenticate_header(self, request: Request) -> str:
        return self.keyword
