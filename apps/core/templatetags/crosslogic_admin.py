"""Template tags and filters for the admin (the index's ``crosslogic_summary`` lives in apps.metering).

``calendar_date_hierarchy`` replaces Django's ``date_hierarchy`` on very large tables. Django
finds the years, months or days that have rows with a ``SELECT DISTINCT`` over every row in
range on each page view; this one lists the same periods (only those with rows) but asks the
database one question per candidate period, "is there a row in [start, end)?", all in one query:
each EXISTS is a single probe of the created_at index, so the cost does not grow with the rows.

The filters ``ms``, ``dollars_micros`` and ``count`` format numbers as apps.core.formatting does.
"""

from __future__ import annotations

import calendar
import datetime
from typing import Any

from django import template
from django.contrib.admin.templatetags.base import InclusionAdminNode
from django.db.models import Exists, Max, Min, QuerySet
from django.utils import formats, timezone
from django.utils.text import capfirst
from django.utils.translation import gettext as _

from apps.core import formatting

register = template.Library()


@register.filter
def ms(value: Any) -> str:
    return formatting.milliseconds(value)


@register.filter
def dollars_micros(value: Any) -> str:
    return formatting.dollars_from_micros(value)


@register.filter(name="count")
def count_filter(value: Any) -> str:
    return formatting.count(value)


def _start(day: datetime.date) -> datetime.datetime:
    moment = datetime.datetime.combine(day, datetime.time.min)
    return timezone.make_aware(moment) if timezone.is_naive(moment) and _aware() else moment


def _aware() -> bool:
    from django.conf import settings

    return bool(settings.USE_TZ)


def periods_with_rows(queryset: QuerySet, field: str, periods: list[tuple[datetime.date, datetime.date]]) -> list[bool]:
    """For each [start, end) day range: does ``queryset`` have a row there? One query, one
    EXISTS (an index probe) per range."""
    if not periods:
        return []
    base = queryset.order_by()
    probes = {
        f"p{i}": Exists(base.filter(**{f"{field}__gte": _start(start), f"{field}__lt": _start(end)}))
        for i, (start, end) in enumerate(periods)
    }
    row = base.annotate(**probes).values(*probes).first()
    if row is None:
        return [False] * len(periods)
    return [bool(row[f"p{i}"]) for i in range(len(periods))]


def _next_month(day: datetime.date) -> datetime.date:
    return datetime.date(day.year + (day.month == 12), day.month % 12 + 1, 1)


def _int(value: Any) -> int | None:
    if isinstance(value, list):  # tolerate a multi-valued parameter
        value = value[-1] if value else None
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def calendar_date_hierarchy(cl: Any) -> dict[str, Any]:
    """The context admin/date_hierarchy.html expects: the periods of the filtered list with rows."""
    field = cl.date_hierarchy
    year_field, month_field, day_field = f"{field}__year", f"{field}__month", f"{field}__day"
    year, month, day = (_int(cl.params.get(name)) for name in (year_field, month_field, day_field))
    queryset = cl.queryset

    def link(filters: dict[str, Any]) -> str:
        return cl.get_query_string(filters, [f"{field}__"])

    if year is None:
        bounds = queryset.aggregate(first=Min(field), last=Max(field))
        if bounds["first"] is None:
            return {"show": False}
        first, last = (timezone.localtime(v) if timezone.is_aware(v) else v for v in (bounds["first"], bounds["last"]))
        if first.year != last.year:
            years = list(range(first.year, last.year + 1))
            inner = [(datetime.date(y, 1, 1), datetime.date(y + 1, 1, 1)) for y in years[1:-1]]
            has_rows = [True, *periods_with_rows(queryset, field, inner), True]  # first and last: by definition
            return {
                "show": True,
                "back": None,
                "choices": [
                    {"link": link({year_field: y}), "title": str(y)}
                    for y, rows in zip(years, has_rows, strict=True)
                    if rows
                ],
            }
        year = first.year
        if first.month == last.month:
            month = first.month
    if not 1 <= year <= 9998:
        return {"show": False}
    if month is None:
        months = [datetime.date(year, m, 1) for m in range(1, 13)]
        has_rows = periods_with_rows(queryset, field, [(m, _next_month(m)) for m in months])
        return {
            "show": True,
            "back": {"link": link({}), "title": _("All dates")},
            "choices": [
                {
                    "link": link({year_field: year, month_field: m.month}),
                    "title": capfirst(formats.date_format(m, "YEAR_MONTH_FORMAT")),
                }
                for m, rows in zip(months, has_rows, strict=True)
                if rows
            ],
        }
    if not 1 <= month <= 12:
        return {"show": False}
    if day is None:
        days = [datetime.date(year, month, d) for d in range(1, calendar.monthrange(year, month)[1] + 1)]
        has_rows = periods_with_rows(queryset, field, [(d, d + datetime.timedelta(days=1)) for d in days])
        return {
            "show": True,
            "back": {"link": link({year_field: year}), "title": str(year)},
            "choices": [
                {
                    "link": link({year_field: year, month_field: month, day_field: d.day}),
                    "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT")),
                }
                for d, rows in zip(days, has_rows, strict=True)
                if rows
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
