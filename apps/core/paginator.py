"""Pagination (admin and API) that stays fast on tables with millions of rows."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from django.core.paginator import Paginator
from django.db import connections, models
from django.db.models import QuerySet
from django.utils.functional import cached_property
from rest_framework.exceptions import ValidationError
from rest_framework.pagination import LimitOffsetPagination
from rest_framework.request import Request

# Below this many rows an exact COUNT(*) is cheap; above it an unfiltered changelist uses
# PostgreSQL's planner estimate instead of scanning the table.
EXACT_COUNT_BELOW = 50_000


def estimated_row_count(model: type[models.Model], using: str = "default") -> int | None:
    """PostgreSQL's estimate of the rows in ``model``'s table (None when unknown or not PostgreSQL)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [model._meta.db_table])
        row = cursor.fetchone()
    # reltuples is -1 for a table never analysed.
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


def fast_count(queryset: QuerySet) -> int:
    """Exact for filtered querysets and small tables; the planner's estimate for a big unfiltered one."""
    if not queryset.query.where:
        estimate = estimated_row_count(queryset.model, using=queryset.db)
        if estimate is not None and estimate >= EXACT_COUNT_BELOW:
            return estimate
    return queryset.count()


class EstimatedCountPaginator(Paginator):
    """The admin's paginator, counting with fast_count()."""

    @cached_property
    def count(self) -> int:
        if isinstance(self.object_list, QuerySet):
            return fast_count(self.object_list)
        return super().count


# Past these a page is no longer a page, and PostgreSQL's bigint LIMIT/OFFSET could overflow.
MAX_LIMIT = 1000
MAX_OFFSET = 2**31 - 1


class StrictLimitOffsetPagination(LimitOffsetPagination):
    """limit/offset where a typo is a 400: DRF silently falls back to the default page for
    ``limit=abc`` or ``offset=-1``, so a client never learns its paging is wrong."""

    max_limit = MAX_LIMIT

    def _param(self, request: Request, name: str, *, minimum: int, maximum: int) -> int | None:
        raw = request.query_params.get(name)
        if raw is None:
            return None
        value = int(raw) if re.fullmatch(r"[0-9]{1,12}", raw) else None
        if value is None or not minimum <= value <= maximum:
            raise ValidationError({name: [f"Must be a whole number from {minimum} to {maximum}."]})
        return value

    def get_limit(self, request: Request) -> int | None:
        limit = self._param(request, self.limit_query_param, minimum=1, maximum=MAX_LIMIT)
        return self.default_limit if limit is None else limit

    def get_offset(self, request: Request) -> int:
        offset = self._param(request, self.offset_query_param, minimum=0, maximum=MAX_OFFSET)
        return offset or 0

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        bounds = {self.limit_query_param: (1, MAX_LIMIT), self.offset_query_param: (0, MAX_OFFSET)}
        for parameter in parameters:
            if parameter["name"] in bounds:
                minimum, maximum = bounds[parameter["name"]]
                parameter["schema"] = {**parameter["schema"], "minimum": minimum, "maximum": maximum}
        return parameters


class EstimatedCountPagination(StrictLimitOffsetPagination):
    """limit/offset for the API; ``count`` is an estimate for a big unfiltered table."""

    def get_count(self, queryset: QuerySet | Sequence[Any]) -> int:
        return fast_count(queryset) if isinstance(queryset, QuerySet) else super().get_count(queryset)
