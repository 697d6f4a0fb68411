"""A FilterSet base for the management API that refuses what its OpenAPI schema does not allow,
instead of ignoring it: django-filter reads ``?active=null`` (or ``?active=maybe``) as "no
filter" and ``?scope=`` as "any scope", so a client's typo silently returns everything. Both are
a 400 JSON naming the parameter (the DRF backend raises the form's errors)."""

from __future__ import annotations

import django_filters

# What django-filter's BooleanWidget reads as a boolean (case-insensitive).
BOOLEAN_WORDS = {"true", "false", "1", "0"}


class StrictFilterSet(django_filters.FilterSet):
    def is_valid(self) -> bool:
        valid = super().is_valid()
        for name, declared in self.filters.items():
            if name not in self.data:
                continue
            getlist = getattr(self.data, "getlist", None)
            values = getlist(name) if getlist is not None else [self.data[name]]
            if isinstance(declared, django_filters.BooleanFilter):
                if any(str(v).lower() not in BOOLEAN_WORDS for v in values):
                    self.form.add_error(name, "Must be true or false.")
            elif isinstance(declared, django_filters.ChoiceFilter | django_filters.MultipleChoiceFilter) and any(
                v == "" for v in values
            ):
                self.form.add_error(name, "Must be one of the listed values, not empty.")
        return valid and not self.form.errors
