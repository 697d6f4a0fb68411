"""What the vLLM simulator says, byte for byte: token counts and the JSON shapes of vLLM 0.11's
OpenAI server (``protocol.py``, ``serving_chat.py``, ``serving_completion.py``: field order, the
nulls vLLM writes, ``exclude_unset`` on chat chunks and not on completion chunks).

Pure functions, no I/O, so the shapes can be tested and reused by benchmarks. Streaming chunks
are assembled from pre-encoded byte pieces: a plain stream's per-token work is a few concatenations.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from dataclasses import dataclass

from vllm_sim.output import WORDS, Choice, alternatives, logprob_of

__all__ = ["WORDS"]  # re-exported: the vocabulary the answers are made of

# Prompt-token accounting (documented in docs/simulator.md): whitespace-separated words, plus
# per-message and priming overheads for chat, plus one BOS token for completions.
CHAT_TOKENS_PER_MESSAGE = 4
CHAT_PRIMING_TOKENS = 3
COMPLETION_BOS_TOKENS = 1


def _dumps(obj: object) -> str:
    # pydantic's model_dump_json (what vLLM uses) writes compact JSON without spaces.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def dumps_bytes(obj: object) -> bytes:
    return _dumps(obj).encode()


def count_words(text: str) -> int:
    return len(text.split())


def message_text(content: object) -> str | None:
    """The text of a chat message's content (a string or a list of parts), None if malformed."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                return None
            if part.get("type") == "text":
                if not isinstance(part.get("text"), str):
                    return None
                texts.append(part["text"])
        return " ".join(texts)
    return None


def chat_prompt_tokens(texts: list[str]) -> int:
    return sum(count_words(t) + CHAT_TOKENS_PER_MESSAGE for t in texts) + CHAT_PRIMING_TOKENS


def completion_prompt_tokens(prompt: str | list[int]) -> int:
    if isinstance(prompt, list):
        return len(prompt)
    return count_words(prompt) + COMPLETION_BOS_TOKENS


def start_offset(seed_text: str) -> int:
    """Where in WORDS an answer starts: the same input gives the same output in every process."""
    return zlib.crc32(seed_text.encode("utf-8", "surrogatepass")) % len(WORDS)


def usage(prompt_tokens: int, completion_tokens: int, *, details: bool = True) -> dict:
    # vLLM's UsageInfo field order; the stream's usage chunk is dumped with exclude_none.
    body: dict = {
        "prompt_tokens": prompt_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "completion_tokens": completion_tokens,
    }
    if details:
        body["prompt_tokens_details"] = None
    return body


def error_body(status: int, message: str, err_type: str) -> bytes:
    """vLLM's ErrorResponse: ``code`` is the HTTP status as an integer."""
    return dumps_bytes({"error": {"message": message, "type": err_type, "param": None, "code": status}})


UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'
DONE = b"data: [DONE]\n\n"


_ESCAPED: dict[str, bytes] = {}


def escaped(piece: str) -> bytes:
    """A token's text as it sits inside a JSON string (words are cached: they need no escaping)."""
    cached = _ESCAPED.get(piece)
    if cached is None:
        cached = json.dumps(piece, ensure_ascii=False)[1:-1].encode()
        if len(_ESCAPED) < 4096:
            _ESCAPED[piece] = cached
    return cached


def _chat_logprobs(choice: Choice, start: int, end: int, top: int) -> dict:
    """vLLM's ChatCompletionLogProbs for tokens [start, end): the sampled token first in each top list."""
    content = []
    for i in range(start, end):
        piece, lp = choice.pieces[i], logprob_of(choice.offset, i)
        tops = [(piece, lp), *alternatives(piece, top - 1)] if top else []
        content.append(
            {
                "token": piece,
                "logprob": lp,
                "bytes": list(piece.encode()),
                "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in tops],
            }
        )
    return {"content": content}


def _completion_logprobs(choice: Choice, start: int, end: int, top: int) -> dict:
    """vLLM's CompletionLogProbs for tokens [start, end): offsets count characters from the answer's start."""
    offset = sum(len(p) for p in choice.pieces[:start])
    body: dict = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for i in range(start, end):
        piece, lp = choice.pieces[i], logprob_of(choice.offset, i)
        body["text_offset"].append(offset)
        body["token_logprobs"].append(lp)
        body["tokens"].append(piece)
        # vLLM lists the sampled token and then `logprobs` others (so up to logprobs + 1 entries).
        body["top_logprobs"].append(dict([(piece, lp), *alternatives(piece, top)]) if top else None)
        offset += len(piece)
    return body


def _tool_delta(choice: Choice, start: int, end: int) -> dict:
    """The tool_calls delta for tokens [start, end), as vLLM's stream sends them: the first delta
    names the function (an "auto" call's arguments follow in later deltas; a guided call's first
    delta already carries some), the rest carry argument text only."""
    tool = choice.tool
    assert tool is not None
    arguments = "".join(choice.pieces[max(start, 1 if tool.mode == "auto" else 0) : end])
    # vLLM indexes a named tool call by the choice's index, the others by the call's position.
    index = choice.index if tool.mode == "named" else 0
    if start == 0:
        call: dict = {"id": tool.id, "type": "function", "index": index, "function": {"name": tool.name}}
        if tool.mode != "auto" or arguments:
            call["function"]["arguments"] = arguments
        return {"tool_calls": [call]}
    return {"tool_calls": [{"index": index, "function": {"arguments": arguments}}]}


_PLAIN_CHAT_TAIL = b'"},"logprobs":null,"finish_reason":null,"token_ids":null}]}\n\n'
_FINAL_CHAT_TAIL = b'"},"logprobs":null,"finish_reason":"%s","stop_reason":null,"token_ids":null}]}\n\n'
_PLAIN_COMPLETION_TAIL = (
    b'","logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
    b'"token_ids":null}],"usage":null}\n\n'
)
_FINAL_COMPLETION_TAIL = (
    b'","logprobs":null,"finish_reason":"%s","stop_reason":null,"prompt_token_ids":null,'
    b'"token_ids":null}],"usage":null}\n\n'
)


@dataclass
class StreamEncoder:
    """One stream's SSE events. The prefix of every event is encoded once; a plain chunk (no
    logprobs, token ids or running usage) is then a handful of byte concatenations."""

    prefix: bytes  # `data: {"id":…,"object":…,"created":…,"model":…,"choices":[`
    chat: bool
    prompt_tokens: int
    id: str
    created: int
    model: str
    logprobs: int | None = None
    return_token_ids: bool = False
    prompt_ids: list[int] | None = None
    continuous_usage: bool = False

    @classmethod
    def create(
        cls,
        *,
        chat: bool,
        request_id: str,
        created: int,
        model: str,
        prompt_tokens: int,
        logprobs: int | None = None,
        return_token_ids: bool = False,
        prompt_ids: list[int] | None = None,
        continuous_usage: bool = False,
    ) -> StreamEncoder:
        head = _dumps(
            {
                "id": request_id,
                "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created,
                "model": model,
            }
        )
        return cls(
            prefix=f'data: {head[:-1]},"choices":['.encode(),
            chat=chat,
            prompt_tokens=prompt_tokens,
            id=request_id,
            created=created,
            model=model,
            logprobs=logprobs,
            return_token_ids=return_token_ids,
            prompt_ids=prompt_ids,
            continuous_usage=continuous_usage,
        )

    def _usage(self, completion_tokens: int, *, details: bool) -> bytes:
        return dumps_bytes(usage(self.prompt_tokens, completion_tokens, details=details))

    def role_chunk(self, index: int = 0) -> bytes:
        """A chat stream's first event per choice: the assistant role with empty content."""
        out = (
            self.prefix + b'{"index":%d,"delta":{"role":"assistant","content":""},"logprobs":null,'
            b'"finish_reason":null}]' % index
        )
        if self.continuous_usage:
            out += b',"usage":' + self._usage(0, details=False)
        ids = dumps_bytes(self.prompt_ids) if self.return_token_ids else b"null"
        return out + b',"prompt_token_ids":' + ids + b"}\n\n"

    def __post_init__(self) -> None:
        self.plain = self.logprobs is None and not self.return_token_ids and not self.continuous_usage
        self._heads: dict[int, bytes] = {}

    def _plain_head(self, index: int) -> bytes:
        head = self._heads.get(index)
        if head is None:
            head = self.prefix + (b'{"index":%d,"delta":{"content":"' if self.chat else b'{"index":%d,"text":"') % index
            self._heads[index] = head
        return head

    def chunk(self, choice: Choice, start: int, end: int, *, finish_reason: str | None) -> bytes:
        """The event for tokens [start, end) of ``choice`` (several tokens when the client read slowly)."""
        if self.plain and choice.tool is None:
            # The common case, kept to a few concatenations per token (the benchmark's hot path).
            text = (
                escaped(choice.pieces[start])
                if end == start + 1
                else b"".join(escaped(p) for p in choice.pieces[start:end])
            )
            if finish_reason is None:
                tail = _PLAIN_CHAT_TAIL if self.chat else _PLAIN_COMPLETION_TAIL
            else:
                tail = (_FINAL_CHAT_TAIL if self.chat else _FINAL_COMPLETION_TAIL) % finish_reason.encode()
            return self._plain_head(choice.index) + text + tail
        if self.logprobs is None:
            lp = b"null"
        elif self.chat:
            lp = dumps_bytes(_chat_logprobs(choice, start, end, self.logprobs))
        else:
            lp = dumps_bytes(_completion_logprobs(choice, start, end, self.logprobs))
        finish = (
            b'"finish_reason":null'
            if finish_reason is None
            else b'"finish_reason":"%s","stop_reason":null' % finish_reason.encode()
        )
        ids = dumps_bytes(choice.ids[start:end]) if self.return_token_ids else b"null"
        if self.chat:
            if choice.tool is not None:
                delta = dumps_bytes(_tool_delta(choice, start, end))
            else:
                delta = b'{"content":"' + b"".join(escaped(p) for p in choice.pieces[start:end]) + b'"}'
            out = (
                self.prefix
                + b'{"index":%d,"delta":' % choice.index
                + delta
                + b',"logprobs":'
                + lp
                + b","
                + finish
                + b',"token_ids":'
                + ids
                + b"}]"
            )
            if self.continuous_usage:
                out += b',"usage":' + self._usage(end, details=False)
            return out + b"}\n\n"
        text = b"".join(escaped(p) for p in choice.pieces[start:end])
        if finish_reason is None:
            finish += b',"stop_reason":null'
        prompt_ids = dumps_bytes(self.prompt_ids) if self.return_token_ids and start == 0 else b"null"
        use = self._usage(end, details=True) if self.continuous_usage else b"null"
        return (
            self.prefix
            + b'{"index":%d,"text":"' % choice.index
            + text
            + b'","logprobs":'
            + lp
            + b","
            + finish
            + b',"prompt_token_ids":'
            + prompt_ids
            + b',"token_ids":'
            + ids
            + b'}],"usage":'
            + use
            + b"}\n\n"
        )

    def usage_chunk(self, completion_tokens: int) -> bytes:
        body: dict = {
            "id": self.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
            "usage": usage(self.prompt_tokens, completion_tokens, details=False),
        }
        return b"data: " + dumps_bytes(body) + b"\n\n"


def _message(choice: Choice) -> dict:
    message: dict = {
        "role": "assistant",
        "content": choice.text,
        "refusal": None,
        "annotations": None,
        "audio": None,
        "function_call": None,
        "tool_calls": [],
        "reasoning_content": None,
    }
    if choice.tool is not None:
        # An "auto" call found by the tool parser leaves no content; a guided one leaves "".
        message["content"] = None if choice.tool.mode == "auto" else ""
        message["tool_calls"] = [
            {
                "id": choice.tool.id,
                "type": "function",
                "function": {"name": choice.tool.name, "arguments": choice.arguments},
            }
        ]
    return message


def chat_response(
    *,
    request_id: str,
    created: int,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    logprobs: int | None = None,
    return_token_ids: bool = False,
    prompt_ids: list[int] | None = None,
) -> bytes:
    return dumps_bytes(
        {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "message": _message(c),
                    "logprobs": None if logprobs is None else _chat_logprobs(c, 0, len(c.pieces), logprobs),
                    "finish_reason": c.finish_reason,
                    "stop_reason": None,
                    "token_ids": c.ids if return_token_ids else None,
                }
                for c in choices
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(len(c.pieces) for c in choices)),
            "prompt_logprobs": None,
            "prompt_token_ids": prompt_ids if return_token_ids else None,
            "kv_transfer_params": None,
        }
    )


def completion_response(
    *,
    request_id: str,
    created: int,
    model: str,
    choices: list[Choice],
    prompt_tokens: int,
    logprobs: int | None = None,
    return_token_ids: bool = False,
    prompt_ids: list[int] | None = None,
) -> bytes:
    return dumps_bytes(
        {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": None if logprobs is None else _completion_logprobs(c, 0, len(c.pieces), logprobs),
                    "finish_reason": c.finish_reason,
                    "stop_reason": None,
                    "token_ids": c.ids if return_token_ids else None,
                    "prompt_logprobs": None,
                    "prompt_token_ids": prompt_ids if return_token_ids else None,
                }
                for c in choices
            ],
            "service_tier": None,
            "system_fingerprint": None,
            "usage": usage(prompt_tokens, sum(len(c.pieces) for c in choices)),
            "kv_transfer_params": None,
        }
    )


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text: equal texts give equal vectors, in every process."""
    values = []
    for i in range(dim):
        h = zlib.crc32(f"{i}:{text}".encode())
        values.append((h / 0xFFFFFFFF) * 2.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embeddings_response(
    *, request_id: str, created: int, model: str, inputs: list[str], dim: int, base64_encoding: bool, prompt_tokens: int
) -> bytes:
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dim)
        embedding: list[float] | str = vector
        if base64_encoding:
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    return dumps_bytes(
        {
            "id": request_id,
            "object": "list",
            "created": created,
            "model": model,
            "data": data,
            "usage": usage(prompt_tokens, 0),
        }
    )


def models_response(*, model: str, created: int, max_model_len: int) -> bytes:
    permission = {
        "id": f"modelperm-{model}",
        "object": "model_permission",
        "created": created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }
    card = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": "vllm",
        "root": model,
        "parent": None,
        "max_model_len": max_model_len,
        "permission": [permission],
    }
    return dumps_bytes({"object": "list", "data": [card]})


_GAUGES = (
    ("vllm:num_requests_running", "Number of requests in model execution batches."),
    ("vllm:num_requests_waiting", "Number of requests waiting to be processed."),
    ("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage."),
)


def metrics_text(*, model: str, running: int, waiting: int, kv_usage: float) -> bytes:
    """Prometheus text exposition (version 0.0.4) with vLLM's gauge names and labels."""
    escaped = model.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    labels = f'{{engine="0",model_name="{escaped}"}}'
    lines = []
    for (name, help_text), value in zip(_GAUGES, (float(running), float(waiting), kv_usage), strict=True):
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge", f"{name}{labels} {value!r}"]
    return ("\n".join(lines) + "\n").encode()
