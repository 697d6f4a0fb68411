"""How money looks to staff: dollars (never micro-dollars) and a small budget-used bar."""

from __future__ import annotations

from decimal import Decimal

from django.utils.html import format_html
from django.utils.safestring import SafeString

MICROS_PER_DOLLAR = 1_000_000


def dollars(micros: int) -> str:
    """ "$8.50", "$1,234.57"; amounts under a cent keep their precision ("$0.0042")."""
    if 0 < abs(micros) < 10_000:
        return f"${Decimal(micros) / MICROS_PER_DOLLAR:.6f}".rstrip("0")
    return f"${micros / MICROS_PER_DOLLAR:,.2f}"


def micros_to_dollars(micros: int | None) -> Decimal | None:
    return None if micros is None else Decimal(micros) / MICROS_PER_DOLLAR


def dollars_to_micros(value: Decimal | None) -> int | None:
    return None if value is None else int((value * MICROS_PER_DOLLAR).to_integral_value())


def budget_bar(*, spent_micros: int, limit_micros: int | None, alert_percent: int = 80) -> SafeString:
    """This month's spend against a limit: a bar (green, amber from the alert threshold, red at
    the limit) and the figures; just the spend when there is no limit."""
    spent = dollars(spent_micros)
    if limit_micros is None:
        return format_html('<span class="cl-budget">{} <small>(no limit)</small></span>', spent)
    percent = 100 if limit_micros <= 0 else spent_micros * 100 // limit_micros
    if percent >= 100:
        color, flag = "#ba2121", "limit reached"
    elif percent >= alert_percent:
        color, flag = "#d98c00", f"over {alert_percent}%"
    else:
        color, flag = "#3a8a3a", ""
    return format_html(
        '<span class="cl-budget" title="{} of {} this month">'
        '<span style="display:inline-block;vertical-align:middle;width:100px;height:8px;'
        'background:#e5e5e5;border-radius:4px;overflow:hidden">'
        '<span style="display:block;height:8px;width:{}%;background:{}"></span></span> '
        "{} / {} ({}%){}</span>",
        spent,
        dollars(limit_micros),
        min(100, percent),
        color,
        spent,
        dollars(limit_micros),
        percent,
        format_html(' <strong style="color:{}">⚠ {}</strong>', color, flag) if flag else "",
    )
