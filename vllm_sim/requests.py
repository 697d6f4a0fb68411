"""What a request to the simulator asks for, validated like vLLM's OpenAI server does it; bad input
becomes a Reject carrying vLLM's JSON error response."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from aiohttp import web

from vllm_sim import text as txt


class Reject(Exception):  # noqa: N818 - a response to send, not a failure of ours
    def __init__(self, response: web.Response) -> None:
        self.response = response


def json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def error(status: int, message: str, err_type: str) -> Reject:
    return Reject(json_response(status, txt.error_body(status, message, err_type)))


def bad_request(message: str) -> Reject:
    return error(400, message, "BadRequestError")


@dataclass
class Plan:
    """One generation request, validated."""

    request_id: str
    prompt_tokens: int
    offset: int
    n_tokens: int
    finish_reason: str
    stream: bool
    include_usage: bool


def check_model(body: dict, served_model: str) -> None:
    model = body.get("model")
    if model is not None and model != served_model:
        raise error(404, f"The model `{model}` does not exist.", "NotFoundError")


async def read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    return body


def _int_param(body: dict, name: str, *, minimum: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise bad_request(f"`{name}` must be an integer >= {minimum}.")
    return value


def request_id_for(request: web.Request, prefix: str) -> str:
    # vLLM uses the caller's X-Request-Id as the base of the response id when there is one.
    return prefix + (request.headers.get("X-Request-Id") or uuid.uuid4().hex)


def plan_generation(request: web.Request, body: dict, *, chat: bool, served_model: str, max_tokens_default: int,
                    max_model_len: int) -> Plan:
    """Validate a chat or text completion request the way vLLM would, or raise Reject."""
    check_model(body, served_model)
    if chat:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("`messages` must be a non-empty list.")
        texts = []
        for message in messages:
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise bad_request("Each message must be an object with a string `role`.")
            text = txt.message_text(message.get("content"))
            if text is None:
                raise bad_request("A message's `content` must be a string or a list of content parts.")
            texts.append(text)
        prompt_tokens = txt.chat_prompt_tokens(texts)
        seed_text = "\n".join(texts)
        max_tokens = _int_param(body, "max_completion_tokens", minimum=1)
        if max_tokens is None:
            max_tokens = _int_param(body, "max_tokens", minimum=1)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one prompt
        if isinstance(prompt, str):
            seed_text = prompt
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt):
            seed_text = " ".join(map(str, prompt))
        else:
            raise bad_request("`prompt` must be a string or a list of token ids (the simulator serves one "
                               "prompt per request).")
        prompt_tokens = txt.completion_prompt_tokens(prompt)
        max_tokens = _int_param(body, "max_tokens", minimum=1)
    if body.get("n") not in (None, 1):
        raise bad_request("The simulator supports `n` = 1 only.")
    stream = body.get("stream", False)
    if not isinstance(stream, bool | None):
        raise bad_request("`stream` must be a boolean.")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and isinstance(options.get("include_usage", True),
                                                                               bool | None)):
        raise bad_request("`stream_options` must be an object with a boolean `include_usage`.")
    if options is not None and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.")
    # vLLM's StreamOptions defaults include_usage to true once stream_options is present.
    include_usage = bool(options is not None and options.get("include_usage", True))
    # With max_tokens the answer runs exactly that long ("length"); without, it ends naturally
    # after --max-tokens-default tokens ("stop"), as if the model emitted EOS there.
    n_tokens = max_tokens if max_tokens is not None else max_tokens_default
    finish = "length" if max_tokens is not None else "stop"
    limit = max_model_len
    if prompt_tokens + n_tokens > limit:
        where = "messages" if chat else "prompt"
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{prompt_tokens + n_tokens} tokens ({prompt_tokens} in the {where}, {n_tokens} in the completion). "
            f"Please reduce the length of the {where} or completion.")
    return Plan(request_id=request_id_for(request, "chatcmpl-" if chat else "cmpl-"), prompt_tokens=prompt_tokens,
                 offset=txt.start_offset(seed_text), n_tokens=n_tokens, finish_reason=finish,
                 stream=bool(stream), include_usage=include_usage)
