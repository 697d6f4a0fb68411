"""Admin pagination that stays fast on tables with millions of rows."""

from __future__ import annotations

from django.core.paginator import Paginator
from django.db import connections
from django.utils.functional import cached_property

# Below this many rows an exact COUNT(*) is cheap; above it an unfiltered changelist uses
# PostgreSQL's planner estimate instead of scanning the table.
EXACT_COUNT_BELOW = 50_000


def estimated_row_count(model: type, using: str = "default") -> int | None:
    """PostgreSQL's estimate of the rows in ``model``'s table (None when unknown or not PostgreSQL)."""
    connection = connections[using]
    if connection.vendor != "postgresql":
        return None
    with connection.cursor() as cursor:
        cursor.execute("SELECT reltuples::bigint FROM pg_class WHERE oid = %s::regclass", [model._meta.db_table])
        row = cursor.fetchone()
    # reltuples is -1 for a table never analysed.
    return int(row[0]) if row and row[0] is not None and row[0] >= 0 else None


class EstimatedCountPaginator(Paginator):
    """Exact counts for filtered lists and small tables; the planner's estimate for a big unfiltered one."""

    @cached_property
    def count(self) -> int:
        queryset = self.object_list
        query = getattr(queryset, "query", None)
        if query is not None and not query.where:
            estimate = estimated_row_count(queryset.model, using=queryset.db)
            if estimate is not None and estimate >= EXACT_COUNT_BELOW:
                return estimate
        return super().count
