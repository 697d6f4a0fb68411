"""Reading a time range from user input (the usage APIs, the management commands).

Accepted: an ISO 8601 date (``2026-11-30``: midnight UTC) or date-time (``2026-11-30T10:00Z``,
``+02:00`` offsets; no offset means UTC), or Unix seconds (``1796032800``, like OpenAI's usage API).
Every error is a ValueError whose message names the parameter, for a 400 or a CommandError.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from apps.metering.rollups import HOUR, ceil_hour, floor_hour

MAX_HOURLY_ROWS_DAYS = 31  # group_by=hour over more than a month is a table nobody reads


def parse_moment(value: str, *, name: str) -> datetime:
    text = value.strip()
    if not text:
        raise ValueError(f"{name}: empty; give an ISO 8601 date or date-time, or Unix seconds")
    try:
        if text.isdigit():
            moment = datetime.fromtimestamp(int(text), tz=UTC)
        elif len(text) == 10:
            moment = datetime.combine(date.fromisoformat(text), datetime.min.time(), tzinfo=UTC)
        else:
            moment = datetime.fromisoformat(text.replace("z", "Z"))
    except (ValueError, OverflowError, OSError):
        raise ValueError(
            f"{name}: {value[:40]!r} is not an ISO 8601 date (2026-11-30), date-time (2026-11-30T10:00:00Z) "
            "or Unix seconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    if not datetime(2000, 1, 1, tzinfo=UTC) <= moment <= datetime(2200, 1, 1, tzinfo=UTC):
        raise ValueError(f"{name}: {value[:40]!r} is out of range")
    return moment.astimezone(UTC)


def parse_range(
    *,
    start: str | None,
    end: str | None,
    now: datetime,
    default_days: int = 7,
    max_days: int = 400,
) -> tuple[datetime, datetime]:
    """[start, end) in whole UTC hours; end defaults to the end of the current hour and start to
    ``default_days`` before end."""
    end_at = ceil_hour(parse_moment(end, name="end")) if end else floor_hour(now) + HOUR
    start_at = floor_hour(parse_moment(start, name="start")) if start else end_at - timedelta(days=default_days)
    if end_at <= start_at:
        raise ValueError("end must be after start")
    if end_at - start_at > timedelta(days=max_days):
        raise ValueError(f"the range may span at most {max_days} days")
    return start_at, end_at
