"""Pagination (admin and API) that stays fast on tables with millions of rows."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.core.paginator import Paginator
from django.db import connections, models
from django.db.models import QuerySet
from django.utils.functional import cached_property
from rest_framework.pagination import LimitOffsetPagination

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


class EstimatedCountPagination(LimitOffsetPagination):
    """limit/offset for the API; ``count`` is an estimate for a big unfiltered table."""

    def get_count(self, queryset: QuerySet | Sequence[Any]) -> int:
        return fast_count(queryset) if isinstance(queryset, QuerySet) else super().get_count(queryset)
