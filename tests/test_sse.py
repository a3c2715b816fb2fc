"""The two Server-Sent Events readers, in process: `kvctl events` (kvctl/client.py) and
`kvctl bench` (kvctl/bench.py). Chunk boundaries are chosen here, not by a socket."""

from __future__ import annotations

import json

import httpx
import pytest

from kvctl.bench import _Reader
from kvctl.client import _sse_data
from kvctl.errors import KvctlError


def events(*chunks: bytes) -> list[dict]:
    """What `RouterClient.events` yields for a response body arriving in these reads."""
    return list(_sse_data(httpx.Response(200, content=iter(chunks)).iter_lines()))


def test_events_split_anywhere_across_reads_are_whole() -> None:
    body = b'data: {"to": "asleep", "model": "org/a"}\n\ndata: {"to": "awake"}\n\n'
    every_byte = [body[i : i + 1] for i in range(len(body))]
    assert events(*every_byte) == events(body) == [{"to": "asleep", "model": "org/a"}, {"to": "awake"}]
    assert events(b"da", b'ta: {"a"', b": 1}\r", b"\n\r", b"\n") == [{"a": 1}]  # even between \r and \n


def test_data_lines_of_one_event_are_joined_with_newlines() -> None:
    assert events(b'data: {"a":\ndata: [1,\ndata: 2]}\n\n') == [{"a": [1, 2]}]
    assert events(b'data:{"no": "space"}\n\n') == [{"no": "space"}]  # the space after the colon is optional


def test_comments_other_fields_and_blank_lines_alone_are_skipped() -> None:
    body = b': keepalive\n\nevent: state\nid: 7\nretry: 100\ndata: {"a": 1}\n\n\n\n: bye\n\n'
    assert events(body) == [{"a": 1}]


def test_crlf_and_bare_cr_end_lines_as_lf_does() -> None:
    assert events(b'data: {"a": 1}\r\n\r\ndata: {"b": 2}\r\n\r\n') == [{"a": 1}, {"b": 2}]
    assert events(b'data: {"a": 1}\r\rdata: {"b": 2}\r\r') == [{"a": 1}, {"b": 2}]


def test_a_final_event_without_its_blank_line_is_not_dispatched() -> None:
    # The SSE standard: an event the stream ends in the middle of is discarded.
    assert events(b'data: {"a": 1}\n\ndata: {"b": 2}\n') == [{"a": 1}]
    assert events(b'data: {"a": 1}\n\ndata: {"b": 2}') == [{"a": 1}]


def test_json_that_is_not_an_object_is_skipped_and_non_json_is_one_clear_error() -> None:
    assert events(b"data: [1, 2]\n\ndata: 3\n\n" + b'data: {"a": 1}\n\n') == [{"a": 1}]
    with pytest.raises(KvctlError, match=r"^router sent an event that is not JSON: '\{broken'$"):
        events(b"data: {broken\n\n")


# --------------------------------------------------------------------------- kvctl bench


def chunk(text: str, tokens: int | None = None) -> bytes:
    event: dict = {"choices": [{"index": 0, "text": text}]}
    if tokens is not None:
        event["usage"] = {"completion_tokens": tokens}
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def read(*reads: bytes) -> _Reader:
    reader = _Reader(stream=True)
    for data in reads:
        reader.feed(data)
    reader.finish()
    return reader


def test_bench_counts_every_chunk_however_the_reads_split_the_lines() -> None:
    body = chunk("a") + chunk("b") + chunk("") + chunk("c", tokens=9) + b"data: [DONE]\n\n"
    whole, bytewise = read(body), read(*(body[i : i + 1] for i in range(len(body))))
    for reader in (whole, bytewise):
        assert (reader.chunks, reader.done, reader.error, reader.tokens) == (3, True, None, 9)  # the empty text is no token
    assert bytewise.first is not None and bytewise.last is not None and bytewise.first <= bytewise.last


def test_bench_reads_crlf_and_skips_comments() -> None:
    body = b": ping\r\n\r\n" + chunk("a").replace(b"\n", b"\r\n") + b"data: [DONE]\r\n\r\n"
    reader = read(body)
    assert (reader.chunks, reader.done, reader.error) == (1, True, None)


def test_bench_chat_deltas_count_and_the_usage_chunk_gives_the_tokens() -> None:
    delta = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
    reasoning = b'data: {"choices": [{"index": 0, "delta": {"reasoning_content": "hmm"}}]}\n\n'
    usage = b'data: {"choices": [], "usage": {"completion_tokens": 4}}\n\n'
    reader = read(delta + reasoning + usage + b"data: [DONE]\n\n")
    assert (reader.chunks, reader.tokens, reader.error) == (2, 4, None)


def test_bench_a_stream_without_done_or_with_a_bad_event_is_an_error() -> None:
    assert read(chunk("a")).error == "stream ended without [DONE]"
    assert read(chunk("a") + b"data: [DONE]").error == "stream ended without [DONE]"  # its line never ended
    assert read(b"data: {oops\n\n" + b"data: [DONE]\n\n").error == "unparseable SSE data: b'{oops'"
    failed = read(b'data: {"error": {"message": "engine died", "code": 502}}\n\n' + b"data: [DONE]\n\n")
    assert failed.error == "engine died"
