"""What the simulated model generates, before any wire format: token texts, token ids and
logprobs, JSON documents for ``response_format`` and tool-call arguments. Deterministic: the
same request gives the same output in every process. Pure functions, no I/O.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass, field

# Plain ASCII words, nothing JSON would escape, so a word's bytes go into a chunk unchanged.
WORDS: tuple[str, ...] = (
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "lazy",
    "dog",
    "and",
    "then",
    "runs",
    "across",
    "green",
    "field",
    "under",
    "bright",
    "blue",
    "sky",
    "while",
    "birds",
    "sing",
    "softly",
    "in",
    "tall",
    "trees",
    "near",
    "quiet",
    "river",
    "that",
    "flows",
    "toward",
    "distant",
    "hills",
    "where",
    "old",
    "stone",
    "houses",
    "stand",
    "beside",
    "narrow",
    "roads",
    "lined",
    "with",
    "golden",
    "wheat",
    "swaying",
    "gently",
    "as",
    "warm",
    "wind",
    "carries",
    "sweet",
    "scent",
    "of",
    "summer",
    "flowers",
    "through",
    "open",
    "windows",
    "every",
    "day",
    "until",
    "night",
    "falls",
)
# Token ids: words are 1000 + their index; any other piece (JSON punctuation) hashes into a
# range of its own. Only their stability matters (return_token_ids).
WORD_ID_BASE = 1000
PIECE_ID_BASE = 5000
PIECE_ID_SPAN = 25000
BOS_TOKEN_ID = 1
_WORD_IDS = {w: WORD_ID_BASE + i for i, w in enumerate(WORDS)}

# Logprobs: the sampled token and then the words after it in the list, each less likely.
SAMPLED_LOGPROB_STEPS = (-0.0625, -0.125, -0.25, -0.5)
ALTERNATIVE_LOGPROB_STEP = -1.5

# JSON documents: how many words a generated string holds, how deep a schema is followed.
JSON_STRING_WORDS = 3
JSON_TEXT_WORDS = 8
JSON_MAX_DEPTH = 6
JSON_MAX_ITEMS = 64

_PIECE = re.compile(r"\s*[A-Za-z0-9_]+|\s*[^A-Za-z0-9_\s]|\s+$")


def word_text(offset: int, i: int) -> str:
    word = WORDS[(offset + i) % len(WORDS)]
    return word if i == 0 else " " + word


def words(offset: int, n: int) -> list[str]:
    return [word_text(offset, i) for i in range(n)]


def token_id(piece: str) -> int:
    word_id = _WORD_IDS.get(piece.lstrip(" "))
    if word_id is not None:
        return word_id
    return PIECE_ID_BASE + zlib.crc32(piece.encode("utf-8", "surrogatepass")) % PIECE_ID_SPAN


def prompt_token_ids(seed_text: str, count: int) -> list[int]:
    """``count`` stable ids for a prompt (its exact tokenization is not simulated)."""
    if count <= 0:
        return []
    base = zlib.crc32(seed_text.encode("utf-8", "surrogatepass"))
    return [BOS_TOKEN_ID] + [WORD_ID_BASE + (base + i) % PIECE_ID_SPAN for i in range(count - 1)]


def split_pieces(document: str) -> list[str]:
    """A JSON document as tokens: each word or punctuation mark, with its leading whitespace."""
    pieces = _PIECE.findall(document)
    assert "".join(pieces) == document  # the split must never lose a character
    return pieces


def logprob_of(offset: int, i: int) -> float:
    return SAMPLED_LOGPROB_STEPS[(offset + i) % len(SAMPLED_LOGPROB_STEPS)]


def alternatives(piece: str, k: int) -> list[tuple[str, float]]:
    """``k`` other candidates for a position, each less likely than the one before."""
    start = zlib.crc32(piece.encode("utf-8", "surrogatepass")) % len(WORDS)
    out: list[tuple[str, float]] = []
    j = 0
    while len(out) < k:
        word = " " + WORDS[(start + j) % len(WORDS)]
        j += 1
        if word != piece:
            out.append((word, ALTERNATIVE_LOGPROB_STEP * (len(out) + 1)))
    return out


# --- JSON documents ----------------------------------------------------------------------------


def _schema_instance(schema: object, offset: int, depth: int) -> object:
    """A small value valid for the common JSON-schema keywords (type, properties, items, enum,
    const, anyOf/oneOf/allOf, minItems); anything else gets a string."""
    if not isinstance(schema, dict) or depth > JSON_MAX_DEPTH:
        return " ".join(w.strip() for w in words(offset, JSON_STRING_WORDS))
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _schema_instance(options[0], offset, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if kind is None and isinstance(schema.get("properties"), dict):
        kind = "object"
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            properties = {}
        return {
            str(name): _schema_instance(sub, offset + i + 1, depth + 1)
            for i, (name, sub) in enumerate(properties.items())
        }
    if kind == "array":
        minimum = schema.get("minItems")
        if not isinstance(minimum, int):
            minimum = 1
        # A huge minItems would only be cut by max_tokens anyway: never build more than that.
        count = min(max(minimum, 1), JSON_MAX_ITEMS)
        return [_schema_instance(schema.get("items"), offset + i, depth + 1) for i in range(count)]
    if kind == "integer":
        low = schema.get("minimum")
        if not isinstance(low, int):
            low = 0
        return low + offset % 10
    if kind == "number":
        low = schema.get("minimum")
        if not isinstance(low, int | float):
            low = 0
        return low + (offset % 10) + 0.5
    if kind == "boolean":
        return offset % 2 == 0
    if kind == "null":
        return None
    return " ".join(w.strip() for w in words(offset, JSON_STRING_WORDS))


def schema_document(schema: object, offset: int) -> str:
    return json.dumps(_schema_instance(schema, offset, 0), ensure_ascii=False)


def object_document(offset: int) -> str:
    return json.dumps({"text": "".join(words(offset, JSON_TEXT_WORDS))}, ensure_ascii=False)


# --- one choice of an answer ---------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCall:
    """A tool call the simulated model makes; ``mode`` is how vLLM produced it: "auto" (the tool
    parser found it in free text), "named" or "required" (guided decoding)."""

    id: str
    name: str
    mode: str


@dataclass
class Choice:
    """One of the ``n`` answers: its tokens (texts) and why it ended."""

    index: int
    pieces: list[str]
    finish_reason: str
    offset: int  # for logprob values
    tool: ToolCall | None = None
    ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [token_id(p) for p in self.pieces]

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def arguments(self) -> str:
        """A tool call's arguments: the pieces after the name token ("auto") or all of them."""
        return "".join(self.pieces[1:] if self.tool and self.tool.mode == "auto" else self.pieces)


def cut(pieces: list[str], limit: int | None) -> tuple[list[str], str]:
    """A natural answer under a max_tokens limit: (tokens, finish_reason)."""
    if limit is not None and len(pieces) > limit:
        return pieces[:limit], "length"
    return pieces, "stop"
