"""Where `/v1/responses` keeps the responses clients asked to store (`store`, true by default):
for each, the Response object that GET `/v1/responses/{id}` answers and the chat messages that led
to it, so a later request naming it as `previous_response_id` continues the conversation (its
messages, then its output as assistant and tool-call messages, then the new input). The store is a
bounded in-memory map: at most `max_entries` responses and `max_bytes` of their JSON; the
least recently stored go first when either bound is hit. It lives in the front's process, so
everything in it is lost on restart (and each front replica has its own): a client that needs
its conversations to survive keeps them itself and sends the whole input. The front serves one
asyncio loop, so the store takes no locks.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class StoredResponse:
    """One stored response: the Response object and the chat messages of its input (the whole
    conversation up to it, without its `instructions`, which a continuation does not inherit)."""

    response: dict[str, Any]
    messages: list[dict[str, Any]]
    size: int = field(default=0, compare=False)


def _frozen(value: Any) -> tuple[Any, int]:
    """A private copy of `value` (the caller may go on changing its own) and its JSON size in
    bytes, which is what an entry is charged: a fair proxy for what Python holds."""
    text = json.dumps(value, separators=(",", ":"))
    return json.loads(text), len(text.encode())


class ResponseStore:
    """A bounded map from response id to `StoredResponse`, evicting the oldest stored first."""

    def __init__(self, max_entries: int = 1000, max_bytes: int = 64 * 1024 * 1024) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError("max_entries and max_bytes must be positive")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, StoredResponse] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, response_id: object) -> bool:
        return response_id in self._entries

    @property
    def bytes(self) -> int:
        """The JSON size of everything stored."""
        return self._bytes

    def put(self, response: dict[str, Any], messages: list[dict[str, Any]]) -> bool:
        """Store `response` under its `id` (replacing an earlier one, which then counts as
        newest). False, and nothing stored, when the one entry alone exceeds `max_bytes`."""
        response_id = str(response["id"])
        response, response_size = _frozen(response)
        messages, messages_size = _frozen(messages)
        size = response_size + messages_size
        self.delete(response_id)
        if size > self.max_bytes:
            return False
        while self._entries and (
            len(self._entries) >= self.max_entries or self._bytes + size > self.max_bytes
        ):
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= evicted.size
        self._entries[response_id] = StoredResponse(response, messages, size)
        self._bytes += size
        return True

    def get(self, response_id: str) -> StoredResponse | None:
        """The stored entry, or None when it was never stored, deleted, or evicted. Reading does
        not refresh it: eviction follows the order of storing."""
        return self._entries.get(response_id)

    def delete(self, response_id: str) -> bool:
        """Forget one response; False when there was none under that id."""
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return False
        self._bytes -= entry.size
        return True
