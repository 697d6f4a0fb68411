"""What the vLLM simulator says, byte for byte: deterministic tokens, token counts, and the JSON
shapes of vLLM's OpenAI server (modelled on vLLM 0.10's ``protocol.py`` and ``serving_chat.py``).

Pure functions, no I/O, so the shapes can be tested and reused by benchmarks. Streaming chunks
are assembled from pre-encoded byte pieces: a stream's per-token work is two concatenations.
"""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from dataclasses import dataclass

# Plain ASCII words, nothing JSON would escape, so a word's bytes go into a chunk unchanged.
WORDS: tuple[str, ...] = (
    "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "and", "then", "runs",
    "across", "green", "field", "under", "bright", "blue", "sky", "while", "birds", "sing",
    "softly", "in", "tall", "trees", "near", "quiet", "river", "that", "flows", "toward",
    "distant", "hills", "where", "old", "stone", "houses", "stand", "beside", "narrow", "roads",
    "lined", "with", "golden", "wheat", "swaying", "gently", "as", "warm", "wind", "carries",
    "sweet", "scent", "of", "summer", "flowers", "through", "open", "windows", "every", "day",
    "until", "night", "falls",
)
_FIRST = tuple(w.encode() for w in WORDS)  # a completion's first token has no leading space
_NEXT = tuple((" " + w).encode() for w in WORDS)

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
    return zlib.crc32(seed_text.encode()) % len(WORDS)


def token_bytes(offset: int, i: int) -> bytes:
    index = (offset + i) % len(WORDS)
    return _FIRST[index] if i == 0 else _NEXT[index]


def generated_text(offset: int, n: int) -> str:
    return b"".join(token_bytes(offset, i) for i in range(n)).decode()


def usage(prompt_tokens: int, completion_tokens: int, *, details: bool = True) -> dict:
    # vLLM's UsageInfo field order; the stream's usage chunk is dumped with exclude_none.
    body: dict = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + completion_tokens,
                  "completion_tokens": completion_tokens}
    if details:
        body["prompt_tokens_details"] = None
    return body


def error_body(status: int, message: str, err_type: str) -> bytes:
    """vLLM's ErrorResponse: ``code`` is the HTTP status as an integer."""
    return dumps_bytes({"error": {"message": message, "type": err_type, "param": None, "code": status}})


UNAUTHORIZED_BODY = b'{"error":"Unauthorized"}'
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class StreamEncoder:
    """Pre-encoded pieces of one stream's SSE events (chat or text completion)."""

    head: bytes  # up to and including the opening quote of the token text
    middle_tail: bytes  # after the token text, for a chunk without finish_reason
    id: str
    created: int
    model: str
    chat: bool

    @classmethod
    def for_chat(cls, *, request_id: str, created: int, model: str) -> StreamEncoder:
        prefix = _dumps({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model})
        head = f'data: {prefix[:-1]},"choices":[{{"index":0,"delta":{{"content":"'.encode()
        return cls(head=head, middle_tail=b'"},"logprobs":null,"finish_reason":null}]}\n\n',
                   id=request_id, created=created, model=model, chat=True)

    @classmethod
    def for_completion(cls, *, request_id: str, created: int, model: str) -> StreamEncoder:
        prefix = _dumps({"id": request_id, "object": "text_completion", "created": created, "model": model})
        head = f'data: {prefix[:-1]},"choices":[{{"index":0,"text":"'.encode()
        return cls(head=head,
                   middle_tail=b'","logprobs":null,"finish_reason":null,"stop_reason":null}],"usage":null}\n\n',
                   id=request_id, created=created, model=model, chat=False)

    def role_chunk(self) -> bytes:
        """The first chat event: the assistant role with empty content (vLLM sends it first)."""
        head = self.head.replace(b'"delta":{"content":"', b'"delta":{"role":"assistant","content":"')
        return head + b'"},"logprobs":null,"finish_reason":null}]}\n\n'

    def token_chunk(self, text: bytes) -> bytes:
        return self.head + text + self.middle_tail

    def final_token_chunk(self, text: bytes, finish_reason: str) -> bytes:
        if self.chat:
            tail = f'"}},"logprobs":null,"finish_reason":"{finish_reason}","stop_reason":null}}]}}\n\n'
        else:
            tail = f'","logprobs":null,"finish_reason":"{finish_reason}","stop_reason":null}}],"usage":null}}\n\n'
        return self.head + text + tail.encode()

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        body: dict[str, object] = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(prompt_tokens, completion_tokens, details=False)}
        return b"data: " + dumps_bytes(body) + b"\n\n"


def chat_response(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                  prompt_tokens: int, completion_tokens: int) -> bytes:
    message: dict[str, object] = {
        "role": "assistant", "content": text, "refusal": None, "annotations": None, "audio": None,
        "function_call": None, "tool_calls": [], "reasoning_content": None}
    return dumps_bytes({
        "id": request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason,
                     "stop_reason": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens), "prompt_logprobs": None, "kv_transfer_params": None,
    })


def completion_response(*, request_id: str, created: int, model: str, text: str, finish_reason: str,
                        prompt_tokens: int, completion_tokens: int) -> bytes:
    return dumps_bytes({
        "id": request_id, "object": "text_completion", "created": created, "model": model,
        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason,
                     "stop_reason": None, "prompt_logprobs": None}],
        "service_tier": None, "system_fingerprint": None,
        "usage": usage(prompt_tokens, completion_tokens), "kv_transfer_params": None,
    })


def embedding_vector(text: str, dim: int) -> list[float]:
    """A unit vector derived from the text: equal texts give equal vectors, in every process."""
    values = []
    for i in range(dim):
        h = zlib.crc32(f"{i}:{text}".encode())
        values.append((h / 0xFFFFFFFF) * 2.0 - 1.0)
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def embeddings_response(*, request_id: str, created: int, model: str, inputs: list[str], dim: int,
                        base64_encoding: bool, prompt_tokens: int) -> bytes:
    data = []
    for index, text in enumerate(inputs):
        vector = embedding_vector(text, dim)
        embedding: list[float] | str = vector
        if base64_encoding:
            embedding = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": embedding})
    return dumps_bytes({"id": request_id, "object": "list", "created": created, "model": model, "data": data,
                        "usage": usage(prompt_tokens, 0)})


def models_response(*, model: str, created: int, max_model_len: int) -> bytes:
    permission = {"id": f"modelperm-{model}", "object": "model_permission", "created": created,
                  "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                  "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                  "organization": "*", "group": None, "is_blocking": False}
    card = {"id": model, "object": "model", "created": created, "owned_by": "vllm", "root": model,
            "parent": None, "max_model_len": max_model_len, "permission": [permission]}
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
