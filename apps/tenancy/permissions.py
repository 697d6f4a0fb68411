"""Who may call what on the management API.

Staff (a session or a ``cls_`` staff token of an active staff user) may do everything the
view offers. A customer API key (``clk_``, a CustomerPrincipal) may use a view only when the
view names the scope it needs and the key holds it; the view then confines it to its tenant.
"""

from __future__ import annotations

from typing import Any

from rest_framework import permissions
from rest_framework.request import Request

from apps.tenancy.authentication import CustomerPrincipal


def is_staff(request: Request) -> bool:
    user = request.user
    return bool(user and getattr(user, "is_active", False) and getattr(user, "is_staff", False))


def customer(request: Request) -> CustomerPrincipal | None:
    return request.user if isinstance(request.user, CustomerPrincipal) else None


class IsStaff(permissions.BasePermission):
    message = "Staff only: use a staff session or a staff token (cls_…)."

    def has_permission(self, request: Request, view: Any) -> bool:
        return is_staff(request)


class StaffOrCustomerScope(permissions.BasePermission):
    """Staff, or a customer key holding ``view.customer_scope`` for ``view.customer_actions``."""

    def has_permission(self, request: Request, view: Any) -> bool:
        if is_staff(request):
            return True
        principal = customer(request)
        if principal is None:
            self.message = "Staff only: use a staff session or a staff token (cls_…)."
            return False
        scope: str = view.customer_scope
        if not principal.api_key.has_scope(scope):
            self.message = f"This API key lacks the '{scope}' scope."
            return False
        allowed = getattr(view, "customer_actions", None)
        if allowed is not None and getattr(view, "action", None) not in allowed:
            self.message = "API keys cannot do this; staff only."
            return False
        return True
