"""Template tags for the admin (the index's ``crosslogic_summary`` lives in apps.metering).

``calendar_date_hierarchy`` replaces Django's ``date_hierarchy`` on very large tables: Django
lists only the years, months or days that have rows, which costs a ``SELECT DISTINCT`` over
every row in range on each page view; this one offers calendar periods instead and only asks
the database for the first and last date (two index lookups).
"""

from __future__ import annotations

import calendar
import datetime
from typing import Any

from django import template
from django.contrib.admin.templatetags.base import InclusionAdminNode
from django.db.models import Max, Min
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _

register = template.Library()


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # tolerate a multi-valued parameter
        value = value[-1] if value else None
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def calendar_date_hierarchy(cl: Any) -> dict[str, Any]:
    """The context admin/date_hierarchy.html expects, built from the calendar, not from the rows."""
    field = cl.date_hierarchy
    year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
    year, month, day = (_int(cl.params.get(name)) for name in (year_field, month_field, day_field))

    def link(filters: dict[str, Any]) -> str:
        return cl.get_query_string(filters, [f"{field}__"])

    today = timezone.localdate()
    if year is None:
        bounds = cl.queryset.aggregate(first=Min(field), last=Max(field))
        if bounds["first"] is None:
            return {"show": False}
        first, last = (timezone.localtime(v) if timezone.is_aware(v) else v for v in (bounds["first"], bounds["last"]))
        if first.year != last.year:
            return {
                "show": True,
                "back": None,
                "choices": [{"link": link({year_field: y}), "title": str(y)} for y in range(first.year, last.year + 1)],
            }
        year = first.year
        if first.month == last.month:
            month = first.month
    if month is None:
        last_month = today.month if year == today.year else 12
        return {
            "show": True,
            "back": {"link": link({}), "title": _("All dates")},
            "choices": [
                {
                    "link": link({year_field: year, month_field: m}),
                    "title": capfirst(formats.date_format(datetime.date(year, m, 1), "YEAR_MONTH_FORMAT")),
                }
                for m in range(1, last_month + 1)
            ],
        }
    if not 1 <= month <= 12:
        return {"show": False}
    if day is None:
        last_day = calendar.monthrange(year, month)[1]
        if (year, month) == (today.year, today.month):
            last_day = today.day
        return {
            "show": True,
            "back": {"link": link({year_field: year}), "title": str(year)},
            "choices": [
                {
                    "link": link({year_field: year, month_field: month, day_field: d}),
                    "title": capfirst(formats.date_format(datetime.date(year, month, d), "MONTH_DAY_FORMAT")),
                }
                for d in range(1, last_day + 1)
            ],
        }
    try:
        chosen = datetime.date(year, month, day)
    except ValueError:
        return {"show": False}
    return {
        "show": True,
        "back": {
            "link": link({year_field: year, month_field: month}),
            "title": capfirst(formats.date_format(chosen, "YEAR_MONTH_FORMAT")),
        },
        "choices": [{"title": capfirst(formats.date_format(chosen, "MONTH_DAY_FORMAT"))}],
    }


@register.tag(name="calendar_date_hierarchy")
def calendar_date_hierarchy_tag(parser: template.base.Parser, token: template.base.Token) -> InclusionAdminNode:
    # django-stubs 6.1.2 gives InclusionAdminNode a leading `name` parameter; Django 5.2's has none.
    # Keywords keep that stub quirk to the one missing argument.
    return InclusionAdminNode(  # type: ignore[call-arg]
        parser=parser,
        token=token,
        func=calendar_date_hierarchy,
        template_name="date_hierarchy.html",
        takes_context=False,
    )
