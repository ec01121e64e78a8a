"""The stream fast path's regular expressions (prefix trees) against the plain alternations they
replaced: the same events parsed, the same bytes out, on recorded streams and on events made to
hit every key, null or not, first, in the middle or last in its object."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from inferd.server.apis import conform

RECORDED = Path(__file__).resolve().parents[1] / "fixtures" / "recorded"


def _alternation(keys: list[str]) -> bytes:
    return b"|".join(re.escape(k.encode()) for k in sorted(keys))


# The expressions as they were written before the prefix trees: the reference.
_PRIVATE = sorted((conform._CHOICE | conform._ANSWER) - {"completion_probabilities"})
_NULLABLE_NOT = sorted(
    conform._NOT_NULL_DELTA
    | conform._EXTENSIONS_IF_SET
    | conform._NOT_NULL_USAGE
    | conform._NOT_NULL_TOP
)
OLD_NULL_PRIVATE = re.compile(rb',"(?:' + _alternation(_PRIVATE) + rb')":null(?=[,}])')
OLD_MARKERS = re.compile(
    rb'"(?:'
    + _alternation(sorted(conform._CHOICE | conform._ANSWER))
    + rb')":|"(?:'
    + _alternation(_NULLABLE_NOT)
    + rb')":null'
)


def _old_stream_events(route: str, chunk: bytes) -> bytes:
    """`conform.stream_events` with the reference expressions."""
    fix = conform._CHUNKS.get(route)
    if fix is None:
        return chunk
    chunk = OLD_NULL_PRIVATE.sub(b"", chunk)
    if OLD_MARKERS.search(chunk) is None and not (
        route == conform.CHAT and b'"logprobs":{' in chunk
    ):
        return chunk
    out: list[bytes] = []
    for event in chunk.split(b"\n\n"):
        needs = OLD_MARKERS.search(event) is not None or (
            route == conform.CHAT and b'"logprobs":{' in event and b'"refusal":' not in event
        )
        if event.startswith(b"data: {") and needs:
            try:
                data = json.loads(event[6:])
            except ValueError:
                out.append(event)
                continue
            if isinstance(data, dict):
                event = b"data: " + json.dumps(fix(data), separators=(",", ":")).encode()
        out.append(event)
    return b"\n\n".join(out)


def _made_events() -> list[bytes]:
    """Every key the expressions know, with a null and with a value, at each place in an
    object; near misses (a longer or shorter key, a key inside text, a space before the
    colon)."""
    keys = sorted(set(_PRIVATE) | set(_NULLABLE_NOT) | conform._ANSWER | conform._CHOICE)
    values = [b"null", b'"x"', b"1", b"{}", b"[]", b'{"a":null}']
    near = [k + "s" for k in keys] + [k[:-1] for k in keys] + ["x" + k for k in keys]
    events = []
    for key, value in itertools.product([*keys, *near], values):
        k = key.encode()
        for body in (
            b'{"%s":%s,"id":"1"}' % (k, value),  # first
            b'{"id":"1","%s":%s,"model":"m"}' % (k, value),  # middle
            b'{"id":"1","%s":%s}' % (k, value),  # last
            b'{"choices":[{"index":0,"%s":%s}],"id":"1"}' % (k, value),
            b'{"choices":[{"delta":{"%s":%s},"index":0}]}' % (k, value),
            b'{"id":"1", "%s" : %s}' % (k, value),  # spaced
            b'{"choices":[{"delta":{"content":"\\"%s\\":%s"}}]}' % (k, value),  # in text
        ):
            events.append(b"data: " + body + b"\n\n")
    return events


def _recorded_chunks() -> list[bytes]:
    chunks = []
    for path in sorted(RECORDED.rglob("*.sse")):
        raw = path.read_bytes()
        events = [e + b"\n\n" for e in raw.split(b"\n\n") if e.strip()]
        chunks.append(raw)  # the whole stream as one read
        chunks.extend(events)  # one event per read, as llama-server sends them
    return chunks


@pytest.mark.parametrize("route", [conform.CHAT, conform.COMPLETIONS, conform.EMBEDDINGS])
def test_stream_events_are_unchanged_by_the_prefix_trees(route: str) -> None:
    chunks = _recorded_chunks() + _made_events()
    made = _made_events()
    chunks += [b"".join(made[i : i + 5]) for i in range(0, len(made), 5)]  # several per read
    assert len(chunks) > 1000
    for chunk in chunks:
        assert conform.stream_events(route, chunk) == _old_stream_events(route, chunk), chunk


def test_the_expressions_match_what_the_alternations_match() -> None:
    for chunk in _recorded_chunks() + _made_events():
        assert conform.drop_null_private(chunk) == OLD_NULL_PRIVATE.sub(b"", chunk)
        new = [m.span() for m in conform._MARKERS.finditer(chunk)]
        assert new == [m.span() for m in OLD_MARKERS.finditer(chunk)], chunk


def test_the_made_events_reach_both_paths() -> None:
    """The comparison above covers events that are reshaped and events that pass as sent."""
    made = _made_events()
    reshaped = [e for e in made if conform.stream_events(conform.CHAT, e) != e]
    assert 0 < len(reshaped) < len(made)
