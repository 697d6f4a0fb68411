"""Issue #10 item 8: a model's vLLM tool-call and reasoning parsers, in its serving config.

vLLM answers 400 to any request with `tools` unless it was started with --enable-auto-tool-choice
--tool-call-parser <parser>; the catalog carries the parser, the launcher passes it, the admin shows it.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.urls import reverse

from apps.catalog.services import model_create

pytestmark = pytest.mark.django_db


def test_the_change_page_shows_and_saves_the_parsers(admin_client, catalog_model) -> None:
    url = reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk])
    page = admin_client.get(url).content.decode()
    assert 'name="tool_call_parser"' in page and 'name="reasoning_parser"' in page

    catalog_model.tool_call_parser, catalog_model.reasoning_parser = "hermes", "qwen3"
    catalog_model.full_clean()
    catalog_model.save()
    page = admin_client.get(url).content.decode()
    assert 'value="hermes"' in page and 'value="qwen3"' in page


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("tool_call_parser", "Hermes"),
        ("tool_call_parser", "hermes --api-key x"),
        ("reasoning_parser", "r1;rm"),
    ],
)
def test_a_parser_name_must_look_like_one(field, value) -> None:
    with pytest.raises(ValidationError) as info:
        model_create(name="qwen3-8b", storage_uri="s3://weights/qwen3-8b", **{field: value})
    assert field in info.value.message_dict


def test_parser_flags_are_refused_in_extra_args() -> None:
    with pytest.raises(ValidationError) as info:
        model_create(
            name="qwen3-8b", storage_uri="s3://weights/qwen3-8b", extra_vllm_args=["--tool-call-parser", "hermes"]
        )
    assert "own fields" in info.value.message_dict["extra_vllm_args"][0]
