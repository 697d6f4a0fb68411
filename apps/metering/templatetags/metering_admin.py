"""``crosslogic_summary`` feeds the admin index (templates/admin/index.html).

A tag rather than a custom AdminSite keeps ``admin.site`` the default site, so every app's
``@admin.register`` keeps working unchanged.
"""

from __future__ import annotations

from django import template

from apps.metering.selectors import admin_summary

register = template.Library()


@register.simple_tag
def crosslogic_summary() -> dict[str, object]:
    return admin_summary()
