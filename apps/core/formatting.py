"""How numbers read in the admin: milliseconds with one decimal, dollars from integer micro-dollars,
counts with thousands separators. Plain functions (list columns, read-only fields) with template
filters of the same names in apps/core/templatetags/crosslogic_admin.py.

Money stays exact: a micro-dollar amount is printed with all its significant digits (at least
cents), never rounded to a coarser step, so a column of request costs adds up to the total shown.
"""

from __future__ import annotations

from decimal import Decimal

EMPTY = "—"


def milliseconds(value: float | int | None) -> str:
    """``52.401804999988144`` → ``52.4 ms``."""
    if value is None:
        return EMPTY
    return f"{value:,.1f} ms"


def dollars_from_micros(micros: int | None) -> str:
    """``1234567`` → ``$1.234567``; ``2500000`` → ``$2.50``; ``-150`` → ``-$0.00015``."""
    if micros is None:
        return EMPTY
    sign = "-" if micros < 0 else ""
    whole, fraction = divmod(abs(int(micros)), 1_000_000)
    digits = f"{fraction:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}${whole:,}.{digits}"


def dollars(value: Decimal | float | int | None, *, per: str = "") -> str:
    """A Decimal price or cost as dollars with at least cents and no float noise: ``$1.2345/h``."""
    if value is None:
        return EMPTY
    amount = Decimal(str(value))
    text = f"{amount:,f}"
    if "." in text:
        whole, _, fraction = text.partition(".")
        text = f"{whole}.{fraction.rstrip('0').ljust(2, '0')}"
    else:
        text = f"{text}.00"
    sign = "-" if text.startswith("-") else ""
    return f"{sign}${text.lstrip('-')}{'/' + per if per else ''}"


def count(value: int | None) -> str:
    """``1234567`` → ``1,234,567``."""
    if value is None:
        return EMPTY
    return f"{int(value):,}"
