"""Reads of tenancy data that more than one caller needs."""

from __future__ import annotations

import json

from django.db import connection
from django.db.models import QuerySet, TextField
from django.db.models.functions import Cast


def with_scope(queryset: QuerySet, scope: str) -> QuerySet:
    """Keys (or tokens) whose ``scopes`` list holds ``scope``.

    PostgreSQL answers JSON containment from the column; SQLite (the `make run` default) has no
    JSON ``contains``, so there the list's JSON text must hold the quoted name — exact, because
    scope names are plain words that never contain a quote.
    """
    if connection.vendor == "postgresql":
        return queryset.filter(scopes__contains=[scope])
    return queryset.annotate(_scopes_text=Cast("scopes", TextField())).filter(_scopes_text__contains=json.dumps(scope))
