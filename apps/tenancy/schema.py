"""OpenAPI descriptions drf-spectacular cannot infer by itself (imported from CoreConfig.ready)."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from drf_spectacular.plumbing import build_bearer_security_scheme_object


class BearerKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "apps.tenancy.authentication.BearerKeyAuthentication"
    name = "bearerAuth"

    def get_security_definition(self, auto_schema: object) -> dict[str, str]:
        scheme = build_bearer_security_scheme_object(
            header_name="AUTHORIZATION",
            token_prefix="Bearer",  # noqa: S106 - the auth scheme's name, not a secret
            bearer_format="cls_… staff token or clk_… API key",
        )
        scheme["description"] = (
            "A staff token (`cls_…`, full management access for its staff user) or a customer API key "
            "(`clk_…`, confined to its own tenant and to its scopes: `keys:manage`, `usage:read`)."
        )
        return scheme
