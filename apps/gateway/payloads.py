"""Validation of /v1 request bodies: OpenAI's 400s, each naming the offending param."""

from __future__ import annotations

import json
from typing import Any

import orjson
from django.conf import settings

from apps.gateway.errors import bad_request

CHAT, COMPLETIONS, EMBEDDINGS = "chat.completions", "completions", "embeddings"
# What each endpoint requires besides `model`.
_REQUIRED = {CHAT: "messages", COMPLETIONS: "prompt", EMBEDDINGS: "input"}


def loads(body: bytes) -> Any:
    """A request body as Python, accepting exactly what ``json.loads`` accepts.

    orjson first: on our bodies it parses a small chat request in ~1 µs instead of ~10 µs and
    1,000 messages in about two thirds of the time (docs/benchmarks.md). What orjson refuses and
    the standard library takes (NaN and Infinity, an escaped lone surrogate such as ``"\\ud800"``,
    UTF-16/32 bodies, a UTF-8 byte-order mark) goes to ``json.loads``, so the gateway's answer to
    those bodies is the one it gave before; only an integer beyond 64 bits differs (a float here).
    """
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def parse(body: bytes, endpoint: str) -> dict[str, Any]:
    if not body.strip():
        raise bad_request("The request body is empty; send a JSON object.")
    try:
        payload = loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        # json's C decoder gives up on deep nesting (~1,000 levels) with RecursionError.
        raise bad_request("The request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise bad_request("The request body must be a JSON object.")
    model = payload.get("model")
    if model is None:
        raise bad_request("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model:
        raise bad_request("'model' must be a non-empty string.", "model")
    field = _REQUIRED[endpoint]
    if field not in payload:
        raise bad_request(f"Missing required parameter: '{field}'.", field)
    value = payload[field]
    if endpoint == CHAT:
        if not isinstance(value, list) or not value:
            raise bad_request("'messages' must be a non-empty array of message objects.", "messages")
        for i, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request(f"'messages[{i}]' must be an object with a string 'role'.", f"messages[{i}]")
    elif endpoint == COMPLETIONS:
        if not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
            raise bad_request("'prompt' must be a string or a non-empty array.", "prompt")
    elif not isinstance(value, (str, list)) or (isinstance(value, list) and not value):
        raise bad_request("'input' must be a string or a non-empty array.", "input")
    if "stream" in payload and not isinstance(payload["stream"], bool) and payload["stream"] is not None:
        raise bad_request("'stream' must be a boolean.", "stream")
    if endpoint == EMBEDDINGS and payload.get("stream"):
        raise bad_request("Embeddings cannot be streamed.", "stream")
    for name in ("max_tokens", "max_completion_tokens", "n"):
        v = payload.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise bad_request(f"'{name}' must be a positive integer.", name)
    options = payload.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad_request("'stream_options' must be an object.", "stream_options")
    for name in ("include_usage", "continuous_usage_stats"):
        if options and options.get(name) is not None and not isinstance(options[name], bool):
            raise bad_request(f"'stream_options.{name}' must be a boolean.", f"stream_options.{name}")
    return payload


def reserve_tokens(payload: dict[str, Any], body_len: int) -> int:
    """Tokens to reserve before the answer is known: the output cap for each of the ``n`` choices
    plus ~4 bytes per prompt token."""
    out = payload.get("max_completion_tokens") or payload.get("max_tokens")
    if out is None:
        out = 0 if "input" in payload and "messages" not in payload else settings.GATEWAY_DEFAULT_MAX_TOKENS
    return int(out) * int(payload.get("n") or 1) + body_len // 4


def wants_usage_chunk(payload: dict[str, Any]) -> bool:
    """OpenAI's semantics: a stream ends with a usage chunk only for ``include_usage: true``.

    vLLM's own default differs (``include_usage`` is true once ``stream_options`` is present at
    all, so ``{}`` or ``{"continuous_usage_stats": true}`` alone would bring usage); we follow
    OpenAI, whose SDKs our customers use.
    """
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


_USAGE_OPTION = b',"stream_options":{"include_usage":true}}'


def with_usage_option(body: bytes, payload: dict[str, Any]) -> bytes:
    """The body asking vLLM for exactly one usage chunk at the end of the stream, for metering,
    when the client did not ask for usage itself (the gateway removes that chunk again).

    When the client sent no ``stream_options``, the member is appended to the body's bytes:
    everything the client sent reaches the node exactly as sent, and a large prompt is not
    serialised again on the request path. Otherwise the options are rebuilt without
    ``continuous_usage_stats`` (vLLM would put usage into every chunk, which this client did not
    ask for: it gets no usage at all under OpenAI's semantics).
    """
    stripped = body.rstrip()
    if "stream_options" not in payload and stripped.endswith(b"}") and stripped.lstrip().startswith(b"{"):
        return stripped[:-1] + _USAGE_OPTION
    options = {k: v for k, v in (payload.get("stream_options") or {}).items() if k != "continuous_usage_stats"}
    try:
        return json.dumps({**payload, "stream_options": {**options, "include_usage": True}}).encode()
    except RecursionError:
        raise bad_request("The request body is nested too deeply.") from None
