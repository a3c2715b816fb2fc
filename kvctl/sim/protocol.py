"""OpenAI request parsing and response shapes for the simulated engine.

Text is deterministic: the words come from a hash of the prompt and the token index,
so the same prompt gives the same text on every replica and every run. A "token" is
one word; prompt tokens are the whitespace-separated words of the prompt.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

MAX_MODEL_LEN = 8192  # context window reported by /v1/models and enforced like vLLM
DEFAULT_MAX_TOKENS = 16
EMBEDDING_DIM = 32
GARBAGE_TOKEN = "!"  # what an engine emits when its weights were released and never reloaded

_VOCAB = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "it",
    "for",
    "was",
    "on",
    "are",
    "as",
    "with",
    "his",
    "they",
    "at",
    "be",
    "this",
    "from",
    "have",
    "or",
    "by",
    "one",
    "had",
    "not",
    "but",
    "what",
    "all",
    "were",
    "when",
    "we",
    "there",
    "can",
    "an",
    "your",
    "which",
    "their",
    "said",
    "if",
    "do",
    "will",
    "each",
    "about",
    "how",
    "up",
    "out",
    "them",
    "then",
    "she",
    "many",
    "some",
    "so",
    "these",
    "would",
    "other",
    "into",
    "has",
    "more",
    "her",
    "two",
    "like",
    "him",
    "see",
    "time",
    "could",
    "no",
    "make",
    "than",
    "first",
    "been",
    "its",
    "who",
    "now",
    "people",
    "my",
    "made",
    "over",
    "did",
    "down",
    "only",
    "way",
    "find",
    "use",
    "may",
    "water",
    "long",
    "little",
    "very",
]
_MASK = (1 << 64) - 1


class BadRequest(Exception):
    """A request the engine rejects before generating; carries the HTTP status."""

    def __init__(self, message: str, status: int = 400, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


_ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 413: "BadRequestError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def error_body(dialect: str, status: int, message: str, param: str | None = None) -> bytes:
    """The engine's own error shape: vLLM nests it under "error", SGLang sends it flat."""
    err = {"message": message, "type": _ERROR_TYPES.get(status, "BadRequestError"), "param": param, "code": status}
    if dialect == "sglang":
        return dumps({"object": "error", **err})
    return dumps({"error": err})


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class Generation:
    """One validated completion or chat request."""

    chat: bool
    prompt_tokens: int
    max_tokens: int
    stream: bool
    include_usage: bool
    seed: int  # hash of the prompt: picks the words

    def token(self, index: int, garbage: bool = False) -> str:
        if garbage:
            return GARBAGE_TOKEN
        # splitmix64 of (prompt hash, index): cheap, well spread, deterministic.
        x = (self.seed + (index + 1) * 0x9E3779B97F4A7C15) & _MASK
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
        word = _VOCAB[(x ^ (x >> 31)) % len(_VOCAB)]
        return word if index == 0 and self.chat else " " + word

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "total_tokens": self.prompt_tokens + completion_tokens, "completion_tokens": completion_tokens}


def parse_generation(body: dict[str, Any], chat: bool) -> Generation:
    text: str | tuple[str, int]
    if chat:
        text = _messages_text(body.get("messages"))
        max_tokens = _max_tokens(body, "max_completion_tokens")
    else:
        text = _prompt_text(body.get("prompt"))
        max_tokens = _max_tokens(body, "max_tokens")
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be a boolean", param="stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise BadRequest("Stream options can only be defined when `stream=True`.", param="stream_options")
        if not isinstance(options, dict):
            raise BadRequest("'stream_options' must be an object", param="stream_options")
        include_usage = bool(options.get("include_usage"))
    prompt_tokens = len(text.split()) if isinstance(text, str) else text[1]
    if prompt_tokens + max_tokens > MAX_MODEL_LEN:
        raise BadRequest(
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="max_tokens",
        )
    key = text if isinstance(text, str) else text[0]
    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return Generation(chat, prompt_tokens, max_tokens, stream, include_usage, seed)


def _max_tokens(body: dict[str, Any], alias: str) -> int:
    value = body.get("max_tokens")
    if value is None:
        value = body.get(alias)
    if value is None:
        return DEFAULT_MAX_TOKENS
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise BadRequest(f"max_tokens must be at least 1, got {value!r}.", param="max_tokens")
    return value


def _prompt_text(prompt: Any) -> str | tuple[str, int]:
    """The prompt as text, or (hash key, token count) for token-id prompts."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return "\n".join(prompt)
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return json.dumps(prompt), len(prompt)
    raise BadRequest("'prompt' must be a string, a list of strings or a list of token ids", param="prompt")


def _messages_text(messages: Any) -> str:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    parts = []
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest("each message must be an object with a string 'role'", param="messages")
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        elif isinstance(content, list):
            parts.extend(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
        elif content is not None:
            raise BadRequest("message 'content' must be a string or a list of parts", param="messages")
    return "\n".join(parts)


class Shapes:
    """Response bodies and SSE chunks of one request, prefixes built once."""

    __slots__ = ("_created", "_head", "_id", "gen", "model")

    def __init__(self, gen: Generation, model: str) -> None:
        self.gen = gen
        self.model = model
        self._id = ("chatcmpl-" if gen.chat else "cmpl-") + uuid.uuid4().hex
        self._created = int(time.time())
        obj = "chat.completion.chunk" if gen.chat else "text_completion"
        self._head = f'data: {{"id":"{self._id}","object":"{obj}","created":{self._created},"model":{json.dumps(model)},"choices":'.encode()

    def role_chunk(self) -> bytes:
        return self._head + b'[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]}\n\n'

    def token_chunk(self, text: str, finish_reason: str | None) -> bytes:
        fin = b"null" if finish_reason is None else b'"' + finish_reason.encode() + b'"'
        if self.gen.chat:
            return self._head + b'[{"index":0,"delta":{"content":' + dumps(text) + b'},"logprobs":null,"finish_reason":' + fin + b"}]}\n\n"
        return self._head + b'[{"index":0,"text":' + dumps(text) + b',"logprobs":null,"finish_reason":' + fin + b',"stop_reason":null}]}\n\n'

    def usage_chunk(self, completion_tokens: int) -> bytes:
        return self._head + b'[],"usage":' + dumps(self.gen.usage(completion_tokens)) + b"}\n\n"

    def full(self, text: str, completion_tokens: int, finish_reason: str) -> bytes:
        if self.gen.chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text, "tool_calls": []},
                "logprobs": None,
                "finish_reason": finish_reason,
                "stop_reason": None,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None, "prompt_logprobs": None}
            obj = "text_completion"
        return dumps(
            {"id": self._id, "object": obj, "created": self._created, "model": self.model, "choices": [choice], "usage": self.gen.usage(completion_tokens)}
        )


DONE = b"data: [DONE]\n\n"


def embeddings(body: dict[str, Any], model: str) -> bytes:
    items = body.get("input")
    if isinstance(items, str) or (isinstance(items, list) and items and all(isinstance(i, int) and not isinstance(i, bool) for i in items)):
        items = [items]
    if not isinstance(items, list) or not items or not all(isinstance(i, (str, list)) for i in items):
        raise BadRequest("'input' must be a string, a list of strings or token ids", param="input")
    fmt = body.get("encoding_format") or "float"
    if fmt not in ("float", "base64"):
        raise BadRequest("'encoding_format' must be 'float' or 'base64'", param="encoding_format")
    data, tokens = [], 0
    for index, item in enumerate(items):
        key = item if isinstance(item, str) else json.dumps(item)
        tokens += len(item.split()) if isinstance(item, str) else len(item)
        vector = _vector(key)
        value: Any = base64.b64encode(struct.pack(f"<{EMBEDDING_DIM}f", *vector)).decode() if fmt == "base64" else vector
        data.append({"index": index, "object": "embedding", "embedding": value})
    usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0, "prompt_tokens_details": None}
    return dumps({"id": "embd-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()), "model": model, "data": data, "usage": usage})


def _vector(key: str) -> list[float]:
    raw = hashlib.blake2b(key.encode(), digest_size=EMBEDDING_DIM).digest()
    centred = [b - 127.5 for b in raw]
    norm = sum(c * c for c in centred) ** 0.5 or 1.0
    return [c / norm for c in centred]
