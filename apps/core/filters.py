"""A FilterSet base for the management API that refuses what its OpenAPI schema does not allow,
instead of ignoring it: django-filter reads ``?active=null`` (or ``?active=maybe``) as "no
filter", ``?scope=`` or ``?created_before=`` as "any", and ``?status_code=3.5`` as a number
its integer column never equals, so a client's typo silently returns everything (or nothing).
Each is a 400 JSON naming the parameter (the DRF backend raises the form's errors). Free-text
filters (CharFilter) keep accepting an empty value: the schema allows an empty string."""

from __future__ import annotations

import re

import django_filters

# What django-filter's BooleanWidget reads as a boolean (case-insensitive).
BOOLEAN_WORDS = {"true", "false", "1", "0"}
INTEGER = re.compile(r"^-?[0-9]+$")


def _problem(declared: django_filters.Filter, value: str) -> str:
    if isinstance(declared, django_filters.BooleanFilter):
        return "" if value.lower() in BOOLEAN_WORDS else "Must be true or false."
    if isinstance(declared, django_filters.CharFilter) and not isinstance(declared, django_filters.ChoiceFilter):
        return ""
    if value == "":
        return "Must not be empty."
    # The API's NumberFilters are all on integer columns (ids, status codes): the schema says integer.
    if isinstance(declared, django_filters.NumberFilter) and not INTEGER.match(value):
        return "Must be an integer."
    return ""


class StrictFilterSet(django_filters.FilterSet):
    def is_valid(self) -> bool:
        valid = super().is_valid()
        for name, declared in self.filters.items():
            if name not in self.data:
                continue
            getlist = getattr(self.data, "getlist", None)
            values = getlist(name) if getlist is not None else [self.data[name]]
            problem = next((p for p in (_problem(declared, str(v)) for v in values) if p), "")
            if problem:
                self.form.add_error(name, problem)
        return valid and not self.form.errors
