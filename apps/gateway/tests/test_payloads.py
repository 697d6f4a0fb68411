"""The usage option added to streamed requests keeps everything the client sent."""

from __future__ import annotations

import json

import pytest

from apps.gateway.payloads import CHAT, parse, with_usage_option


@pytest.mark.parametrize("body", [
    b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9"}], "stream": true, "top_k": 5}',
    b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"temperature":1.0}\n  ',
])
def test_the_option_is_appended_and_the_clients_bytes_are_kept(body: bytes) -> None:
    out = with_usage_option(body, parse(body, CHAT))

    assert out.startswith(body.rstrip()[:-1])  # every byte the client sent, in its order
    assert json.loads(out) == {**json.loads(body), "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("options", [{}, {"include_usage": False, "continuous_usage_stats": True}, None])
def test_existing_stream_options_are_merged_not_duplicated(options) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                       "stream_options": options}).encode()

    out = with_usage_option(body, parse(body, CHAT))

    assert out.count(b'"stream_options"') == 1
    assert json.loads(out)["stream_options"] == {**(options or {}), "include_usage": True}


def test_a_body_with_a_byte_order_mark_is_rebuilt_rather_than_spliced() -> None:
    body = b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}'

    out = with_usage_option(body, parse(body, CHAT))

    assert json.loads(out)["stream_options"] == {"include_usage": True} and not out.startswith(b"\xef")
