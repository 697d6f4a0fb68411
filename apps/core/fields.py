"""Serializer fields for the management API that take only what its OpenAPI schema says: DRF's
CharField turns a JSON number into a string (``{"reason": 5}`` becomes ``"5"``), so a client
that sends the wrong type never hears of it. Here a non-string is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from django.db import models
from rest_framework import serializers


class _StringsOnly:
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            raise serializers.ValidationError("Not a valid string.", code="invalid")
        return super().to_internal_value(data)  # type: ignore[misc]  # the DRF field it is mixed into


class StrictCharField(_StringsOnly, serializers.CharField):
    pass


class StrictSlugField(_StringsOnly, serializers.SlugField):
    pass


class StrictModelSerializer(serializers.ModelSerializer):
    """A ModelSerializer whose generated text fields are StrictCharFields."""

    serializer_field_mapping = {
        **serializers.ModelSerializer.serializer_field_mapping,
        models.CharField: StrictCharField,
        models.TextField: StrictCharField,
        models.SlugField: StrictSlugField,
    }
