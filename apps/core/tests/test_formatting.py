from __future__ import annotations

from decimal import Decimal

import pytest

from apps.core import formatting


@pytest.mark.parametrize(
    ("value", "text"),
    [(52.401804999988144, "52.4 ms"), (0, "0.0 ms"), (1234.56, "1,234.6 ms"), (None, "—"), (0.04, "0.0 ms")],
)
def test_milliseconds_have_one_decimal(value, text) -> None:
    assert formatting.milliseconds(value) == text


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "$0.00"),
        (7, "$0.000007"),
        (1_500_016, "$1.500016"),
        (2_500_000, "$2.50"),
        (1_234_000_000, "$1,234.00"),
        (-150, "-$0.00015"),
        (None, "—"),
    ],
)
def test_dollars_from_micros_are_exact(micros, text) -> None:
    assert formatting.dollars_from_micros(micros) == text


def test_dollars_from_micros_never_rounds_a_sum_away() -> None:
    # Every micro-dollar shows: the column of request costs adds up to the total printed.
    assert formatting.dollars_from_micros(sum([333_333] * 3)) == "$0.999999"


@pytest.mark.parametrize(
    ("value", "per", "text"),
    [(Decimal("1.2300"), "h", "$1.23/h"), (Decimal("0.7125"), "h", "$0.7125/h"), (Decimal("12"), "", "$12.00")],
)
def test_decimal_dollars(value, per, text) -> None:
    assert formatting.dollars(value, per=per) == text


def test_counts_have_separators() -> None:
    assert formatting.count(1234567) == "1,234,567" and formatting.count(None) == "—"
