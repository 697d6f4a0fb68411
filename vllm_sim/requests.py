"""What a request to the simulator asks for, validated the way vLLM 0.11's OpenAI server does it
(``protocol.py``'s pydantic models and validators, ``serving_chat.py``'s tool checks, the engine's
context-length and sampling checks, with vLLM's messages); bad input becomes a Reject carrying
vLLM's JSON error response, never a 500."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from aiohttp import web

from vllm_sim import output as out
from vllm_sim import text as txt

# vLLM's --max-logprobs default: more top logprobs than this is refused.
MAX_LOGPROBS = 20
# vLLM's CompletionRequest.max_tokens default (chat has none: the rest of the context).
COMPLETION_MAX_TOKENS_DEFAULT = 16
# vLLM sets no upper bound on n; the simulator does, so one request cannot take it down.
MAX_N = 128
# n > 1 answers start this many words apart, so they differ as sampled answers do.
CHOICE_OFFSET_STEP = 7


class Reject(Exception):  # noqa: N818 - a response to send, not a failure of ours
    def __init__(self, response: web.Response) -> None:
        self.response = response


def json_response(status: int, body: bytes) -> web.Response:
    return web.Response(status=status, body=body, content_type="application/json")


def error(status: int, message: str, err_type: str) -> Reject:
    return Reject(json_response(status, txt.error_body(status, message, err_type)))


def bad_request(message: str) -> Reject:
    return error(400, message, "BadRequestError")


@dataclass(frozen=True)
class ServerOptions:
    """What the server was started with that changes how requests are validated."""

    served_model: str
    max_tokens_default: int
    max_model_len: int
    tool_parser: str | None = None  # set only with --enable-auto-tool-choice


@dataclass
class Plan:
    """One generation request, validated: everything the answer needs."""

    request_id: str
    chat: bool
    prompt_tokens: int
    choices: list[out.Choice]
    stream: bool
    include_usage: bool
    continuous_usage: bool = False
    logprobs: int | None = None  # top logprobs per token; None: no logprobs at all
    return_token_ids: bool = False
    prompt_ids: list[int] | None = None

    @property
    def n_steps(self) -> int:
        return max(len(c.pieces) for c in self.choices)

    @property
    def completion_tokens(self) -> int:
        return sum(len(c.pieces) for c in self.choices)


def check_model(body: dict, served_model: str) -> None:
    model = body.get("model")
    if model is not None and model != served_model:
        raise error(404, f"The model `{model}` does not exist.", "NotFoundError")


async def read_json(request: web.Request) -> dict:
    raw = await request.read()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise bad_request(f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        # JSON may spell a lone surrogate ("\ud800"); Python decodes it, but it is not Unicode text
        # and pydantic refuses such a string, so vLLM answers 400 where we would crash later.
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(
            "Input should be a valid string: the request contains a lone surrogate (invalid Unicode)."
        ) from None
    except RecursionError:
        raise bad_request("Invalid JSON body: nested too deeply.") from None
    return body


def header(request: web.Request, name: bytes) -> str | None:
    """A request header as vLLM sees it: Starlette reads header bytes as Latin-1, so any bytes make a
    valid string (aiohttp's decoded view keeps invalid UTF-8 as surrogates, which cannot be written
    back out or encoded)."""
    for key, value in request.raw_headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_id_for(request: web.Request, prefix: str) -> str:
    # vLLM uses the caller's X-Request-Id as the base of the response id when there is one.
    return prefix + (header(request, b"x-request-id") or uuid.uuid4().hex)


# --- field checks (pydantic's and protocol.py's validators) ------------------------------------


def _int_field(body: dict, name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"`{name}` must be an integer.")
    return value


def _bool_field(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"`{name}` must be a boolean.")
    return value


def _stream_options(body: dict, stream: bool) -> tuple[bool, bool]:
    """(include_usage, continuous_usage). vLLM's StreamOptions defaults include_usage to true once
    stream_options is present; an empty object without stream=true passes its validator."""
    options = body.get("stream_options")
    if options is None:
        return False, False
    if not isinstance(options, dict):
        raise bad_request("`stream_options` must be an object.")
    include = options.get("include_usage", True)
    continuous = options.get("continuous_usage_stats", False)
    if not isinstance(include, bool | None) or not isinstance(continuous, bool | None):
        raise bad_request("`stream_options.include_usage` and `continuous_usage_stats` must be booleans.")
    if options and not stream:
        raise bad_request("Stream options can only be defined when `stream=True`.")
    if not stream:
        return False, False
    return bool(include), bool(include and continuous)


def _check_sampling(n: int, max_tokens: int | None, logprobs: int | None) -> None:
    # SamplingParams' and the engine's own checks, which vLLM answers with 400 as well.
    if n < 1:
        raise bad_request(f"n must be at least 1, got {n}.")
    if n > MAX_N:
        raise bad_request(f"The simulator serves at most n = {MAX_N} choices, got {n}.")
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"max_tokens must be at least 1, got {max_tokens}.")
    if logprobs is not None and logprobs > MAX_LOGPROBS:
        raise bad_request(f"Requested sample logprobs of {logprobs}, which is greater than max allowed: {MAX_LOGPROBS}")


def _check_context(prompt_tokens: int, max_tokens: int | None, max_model_len: int) -> None:
    if prompt_tokens >= max_model_len:
        raise bad_request(
            f"This model's maximum context length is {max_model_len} tokens. However, your request "
            f"has {prompt_tokens} input tokens. Please reduce the length of the input messages."
        )
    if max_tokens is not None and prompt_tokens + max_tokens > max_model_len:
        raise bad_request(
            f"'max_tokens' or 'max_completion_tokens' is too large: {max_tokens}. This model's maximum "
            f"context length is {max_model_len} tokens and your request has {prompt_tokens} input "
            f"tokens ({max_tokens} > {max_model_len} - {prompt_tokens})."
        )


def _response_format(body: dict) -> tuple[str, object]:
    """("text" | "json_object" | "json_schema", the schema)."""
    fmt = body.get("response_format")
    if fmt is None:
        return "text", None
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema", "structural_tag"):
        raise bad_request(
            "`response_format.type` must be one of 'text', 'json_object', 'json_schema' or 'structural_tag'."
        )
    if fmt["type"] != "json_schema":
        return ("text" if fmt["type"] == "structural_tag" else fmt["type"]), None
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise bad_request("`response_format.json_schema` must be an object with a string `name` (and a `schema`).")
    schema = spec.get("schema")
    if schema is not None and not isinstance(schema, dict):
        raise bad_request("`response_format.json_schema.schema` must be an object.")
    return "json_schema", schema


def _tools(body: dict) -> tuple[list[dict], object]:
    """(the function definitions, the tool choice) after protocol.py's check_tool_usage."""
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list):
            raise bad_request("`tools` must be a list.")
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(function, dict)
                or not isinstance(function.get("name"), str)
                or tool.get("type", "function") != "function"
                or not isinstance(function.get("parameters"), dict | None)
            ):
                raise bad_request(
                    'Each tool must be {"type": "function", "function": {"name": ..., "parameters": {...}}}.'
                )
    choice = body.get("tool_choice", "auto" if tools else "none")
    if choice is None or choice == "none":
        return [t["function"] for t in tools or []], "none"
    if tools is None:
        raise bad_request("When using `tool_choice`, `tools` must be set.")
    if choice not in ("auto", "required") and not isinstance(choice, dict):
        raise bad_request(
            f'Invalid value for `tool_choice`: {choice}! Only named tools, "none", "auto" or "required" are supported.'
        )
    if choice == "required" and not tools:
        return [], "none"
    if isinstance(choice, dict):
        usage = 'Correct usage: `{"type": "function", "function": {"name": "my_function"}}`'
        function = choice.get("function")
        if not isinstance(function, dict):
            raise bad_request(f"Invalid value for `function`: `{function}` in `tool_choice`! {usage}")
        if "name" not in function:
            raise bad_request(f"Expected field `name` in `function` in `tool_choice`! {usage}")
        if not isinstance(function["name"], str) or not function["name"]:
            raise bad_request(f"Invalid `name` in `function`: `{function['name']}` in `tool_choice`! {usage}")
        if not any(t["function"]["name"] == function["name"] for t in tools):
            raise bad_request("The tool specified in `tool_choice` does not match any of the specified `tools`")
    return [t["function"] for t in tools or []], choice


def _chat_prompt(body: dict) -> tuple[list[str], str]:
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
    return texts, messages[-1]["role"]


def _completion_prompt(body: dict) -> tuple[str | list[int], str]:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        return prompt, prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt, " ".join(map(str, prompt))
    if prompt is None:
        raise bad_request("At least one of `prompt` or `prompt_embeds` must be set.")
    raise bad_request("`prompt` must be a string or a list of token ids (the simulator serves one prompt per request).")


# --- the plan ---------------------------------------------------------------------------------


def plan_generation(request: web.Request, body: dict, *, chat: bool, server: ServerOptions) -> Plan:
    """Validate a chat or text completion request the way vLLM would, or raise Reject."""
    # 1. The body's fields (pydantic and protocol.py's validators answer these first).
    stream = _bool_field(body, "stream") or False
    include_usage, continuous = _stream_options(body, stream)
    n = _int_field(body, "n")
    n = 1 if n is None else n
    return_ids = bool(_bool_field(body, "return_token_ids"))
    fmt, schema = _response_format(body)
    functions: list[dict] = []
    tool_choice: object = "none"
    if chat:
        texts, last_role = _chat_prompt(body)
        prompt_tokens, seed_text = txt.chat_prompt_tokens(texts), "\n".join(texts)
        functions, tool_choice = _tools(body)
        wants_logprobs = _bool_field(body, "logprobs")
        top = _int_field(body, "top_logprobs")
        if "top_logprobs" not in body:
            top = 0
        if top is not None and top < 0:
            raise bad_request("`top_logprobs` must be a positive value.")
        if top and not wants_logprobs:
            raise bad_request("when using `top_logprobs`, `logprobs` must be set to true.")
        logprobs = top if wants_logprobs and top is not None else None
        given = _int_field(body, "max_completion_tokens") or _int_field(body, "max_tokens")
    else:
        prompt, seed_text = _completion_prompt(body)
        prompt_tokens, last_role = txt.completion_prompt_tokens(prompt), "user"
        logprobs = _int_field(body, "logprobs")
        if logprobs is not None and logprobs < 0:
            raise bad_request("`logprobs` must be a positive value.")
        given = _int_field(body, "max_tokens") if "max_tokens" in body else COMPLETION_MAX_TOKENS_DEFAULT
    # 2. The model, then what the server's flags allow (serving_chat.py), then the engine's checks.
    check_model(body, server.served_model)
    if tool_choice == "auto" and server.tool_parser is None:
        raise bad_request('"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set')
    _check_context(prompt_tokens, given, server.max_model_len)
    _check_sampling(n, given, logprobs)

    room = server.max_model_len - prompt_tokens
    base = txt.start_offset(seed_text)
    choices = []
    for index in range(n):
        offset = (base + CHOICE_OFFSET_STEP * index) % len(txt.WORDS)
        choices.append(
            _choice(
                index,
                offset,
                given=given,
                room=room,
                server=server,
                fmt=fmt,
                schema=schema,
                functions=functions,
                tool_choice=tool_choice,
                last_role=last_role,
            )
        )
    return Plan(
        request_id=request_id_for(request, "chatcmpl-" if chat else "cmpl-"),
        chat=chat,
        prompt_tokens=prompt_tokens,
        choices=choices,
        stream=stream,
        include_usage=include_usage,
        continuous_usage=continuous,
        logprobs=logprobs,
        return_token_ids=return_ids,
        prompt_ids=out.prompt_token_ids(seed_text, prompt_tokens) if return_ids else None,
    )


def _choice(
    index: int,
    offset: int,
    *,
    given: int | None,
    room: int,
    server: ServerOptions,
    fmt: str,
    schema: object,
    functions: list[dict],
    tool_choice: object,
    last_role: str,
) -> out.Choice:
    limit = given if given is not None else room
    tool = None
    if isinstance(tool_choice, dict):
        name = tool_choice["function"]["name"]
        tool = out.ToolCall(id=_tool_call_id(), name=name, mode="named")
    elif tool_choice == "required":
        tool = out.ToolCall(id=_tool_call_id(), name=functions[0]["name"], mode="required")
    elif tool_choice == "auto" and functions and last_role != "tool":
        # The simulated model calls the first tool, and answers in words once it has a result.
        tool = out.ToolCall(id=_tool_call_id(), name=functions[0]["name"], mode="auto")
    if tool is not None:
        parameters = next(f.get("parameters") for f in functions if f["name"] == tool.name)
        arguments = out.split_pieces(out.schema_document(parameters or {"type": "object"}, offset))
        # "auto": the model first writes the call's name (one token the parser turns into the header).
        pieces, finish = out.cut(([""] if tool.mode == "auto" else []) + arguments, limit)
        if tool.mode == "auto" and finish == "stop":
            finish = "tool_calls"  # vLLM reports the parser's find; guided calls keep the engine's reason
        return out.Choice(index=index, pieces=pieces, finish_reason=finish, offset=offset, tool=tool)
    if fmt == "json_object":
        pieces, finish = out.cut(out.split_pieces(out.object_document(offset)), limit)
    elif fmt == "json_schema":
        pieces, finish = out.cut(out.split_pieces(out.schema_document(schema or {"type": "object"}, offset)), limit)
    elif given is not None:
        # With max_tokens the answer runs exactly that long ("length"); without, it ends naturally
        # after --max-tokens-default tokens ("stop"), as if the model emitted EOS there.
        pieces, finish = out.words(offset, given), "length"
    else:
        pieces, finish = out.cut(out.words(offset, server.max_tokens_default), room)
    return out.Choice(index=index, pieces=pieces, finish_reason=finish, offset=offset)


def _tool_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"  # vLLM's make_tool_call_id()
