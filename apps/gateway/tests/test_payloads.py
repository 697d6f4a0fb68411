"""Request bodies: the usage option added to streamed requests keeps everything the client sent;
reservations, nesting and stream_options follow OpenAI."""

from __future__ import annotations

import json

import pytest

from apps.gateway.errors import GatewayError
from apps.gateway.payloads import CHAT, COMPLETIONS, parse, reserve_tokens, wants_usage_chunk, with_usage_option


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "h\\u00e9"}], "stream": true, "top_k": 5}',
        b'{"model":"m","messages":[{"role":"user","content":"x"}],"stream":true,"temperature":1.0}\n  ',
    ],
)
def test_the_option_is_appended_and_the_clients_bytes_are_kept(body: bytes) -> None:
    out = with_usage_option(body, parse(body, CHAT))

    assert out.startswith(body.rstrip()[:-1])  # every byte the client sent, in its order
    assert json.loads(out) == {**json.loads(body), "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("options", [{}, {"include_usage": False, "continuous_usage_stats": True}, None])
def test_existing_stream_options_are_merged_not_duplicated(options) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": options}
    ).encode()

    out = with_usage_option(body, parse(body, CHAT))

    assert out.count(b'"stream_options"') == 1
    # continuous_usage_stats is dropped: this client gets no usage, so vLLM need not put it in every chunk.
    assert json.loads(out)["stream_options"] == {"include_usage": True}


def test_a_body_with_a_byte_order_mark_is_rebuilt_rather_than_spliced() -> None:
    body = b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true}'

    out = with_usage_option(body, parse(body, CHAT))

    assert json.loads(out)["stream_options"] == {"include_usage": True} and not out.startswith(b"\xef")


def test_n_choices_reserve_n_times_max_tokens() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100, "n": 4}'

    assert reserve_tokens(parse(body, CHAT), len(body)) == 400 + len(body) // 4


def test_n_choices_without_max_tokens_reserve_n_times_the_default(settings) -> None:
    settings.GATEWAY_DEFAULT_MAX_TOKENS = 50
    body = b'{"model": "m", "prompt": "x", "n": 3}'

    assert reserve_tokens(parse(body, COMPLETIONS), len(body)) == 150 + len(body) // 4


@pytest.mark.parametrize("nested", [b"[" * 100_000 + b"]" * 100_000, b'{"a":' * 100_000 + b"1" + b"}" * 100_000])
def test_deeply_nested_json_is_a_400_not_a_recursion_error(nested: bytes) -> None:
    with pytest.raises(GatewayError) as err:
        parse(nested, CHAT)

    assert err.value.status == 400 and "nested too deeply" in err.value.message


@pytest.mark.parametrize(
    ("options", "wanted"),
    [
        (None, False),
        ({}, False),
        ({"continuous_usage_stats": True}, False),
        ({"include_usage": False}, False),
        ({"include_usage": True}, True),
        ({"include_usage": True, "continuous_usage_stats": True}, True),
    ],
)
def test_a_usage_chunk_only_for_include_usage_true_as_openai_does(options, wanted: bool) -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": options}
    ).encode()

    assert wants_usage_chunk(parse(body, CHAT)) is wanted


def test_a_non_boolean_include_usage_is_a_400_naming_it() -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}}'

    with pytest.raises(GatewayError) as err:
        parse(body, CHAT)

    assert err.value.status == 400 and err.value.param == "stream_options.include_usage"


@pytest.mark.parametrize(("choices", "expected"), [(1, 9), (3, 7)])
def test_a_cut_chat_streams_estimate_leaves_out_each_choices_role_chunk(choices: int, expected: int) -> None:
    from apps.gateway.relay import Exchange

    ex = Exchange(request_id="r", endpoint=CHAT, stream=True, estimated_prompt=12, chunks=10, choices=choices)

    assert ex.tokens() == (12, expected, True)


@pytest.mark.parametrize(
    "body",
    [
        b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}',  # escaped lone surrogate
        b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
        b'\xef\xbb\xbf{"model": "m", "messages": [{"role": "user", "content": "x"}]}',  # UTF-8 byte-order mark
        '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'.encode("utf-16"),
    ],
)
def test_bodies_orjson_refuses_parse_as_the_standard_library_parses_them(body: bytes) -> None:
    import json

    assert parse(body, CHAT) == json.loads(body)


def test_invalid_json_is_a_400_naming_the_problem() -> None:
    with pytest.raises(GatewayError) as err:
        parse(b'{"model": "m", "messages": [', CHAT)

    assert err.value.status == 400 and "not valid JSON" in err.value.message
