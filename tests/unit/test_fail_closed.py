"""Issue 16, without processes: a service started with API keys stays closed when its key set
empties; engine output is cut into bounded lines; the drain refuses queued requests at once."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from inferd.errors import AuthenticationError, DrainingError
from inferd.observability.metrics import Metrics
from inferd.server.admission import Admission, Limits
from inferd.server.keys import KeyFile, KeyRing
from inferd.server.supervisor import _LineCutter


def _touch(path: Path) -> None:
    """A new mtime even on coarse clocks, so the ring re-reads the file."""
    if path.exists():
        os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1))


def _ring_with_one_key(tmp_path: Path) -> tuple[Path, str, KeyRing]:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("app", rpm=None, tpm=None)
    ring = KeyRing(path)
    assert ring.required and ring.active
    return path, key, ring


def _assert_closed(ring: KeyRing, key: str) -> None:
    assert ring.required and not ring.active
    with pytest.raises(AuthenticationError, match="no API keys") as info:
        ring.authenticate(f"Bearer {key}")
    assert info.value.status == 401


def test_revoking_the_last_key_keeps_auth_required(tmp_path: Path) -> None:
    path, key, ring = _ring_with_one_key(tmp_path)
    KeyFile(path).revoke("app")
    _touch(path)
    _assert_closed(ring, key)


def test_deleting_the_keys_file_keeps_auth_required(tmp_path: Path) -> None:
    path, key, ring = _ring_with_one_key(tmp_path)
    path.unlink()
    _assert_closed(ring, key)


@pytest.mark.parametrize("text", ["{}", "", '{"keys": []}', "not json", "[]"])
def test_an_emptied_or_broken_file_keeps_auth_required(tmp_path: Path, text: str) -> None:
    """A mounted Secret emptied, or a file replaced by something unreadable: refused, not open."""
    path, key, ring = _ring_with_one_key(tmp_path)
    path.write_text(text)
    _touch(path)
    _assert_closed(ring, key)


def test_a_key_created_later_turns_auth_on_for_good(tmp_path: Path) -> None:
    """Started without keys (loopback): open; the first key closes it, and it stays closed."""
    path = tmp_path / "keys.json"
    ring = KeyRing(path)
    assert not ring.required
    key = KeyFile(path).create("app", rpm=None, tpm=None)
    assert ring.required
    assert ring.authenticate(f"Bearer {key}").name == "app"
    path.write_text(json.dumps({"keys": []}))
    _touch(path)
    _assert_closed(ring, key)


def test_keys_come_back_without_a_restart(tmp_path: Path) -> None:
    path, key, ring = _ring_with_one_key(tmp_path)
    path.unlink()
    _assert_closed(ring, key)
    fresh = KeyFile(path).create("again", rpm=None, tpm=None)
    assert ring.authenticate(f"Bearer {fresh}").name == "again"


# --------------------------------------------------------------------------- engine output


def test_lines_are_cut_to_the_limit_whatever_their_length() -> None:
    cutter = _LineCutter(100)
    lines = []
    for _ in range(64):  # a 4 MiB line, in 64 KiB reads, held to 100 bytes all along
        lines += cutter.feed(b"x" * 65536)
        assert len(cutter._kept) <= 100
    lines += cutter.feed(b"\nshort\nsplit ")
    lines += cutter.feed("línea\n".encode())
    assert lines[0] == "x" * 100 + f" [... line cut: {4 * 2**20 - 100} more bytes]"
    assert lines[1:] == ["short", "split línea"]
    assert cutter.flush() is None
    cutter.feed(b"no newline at the end")
    assert cutter.flush() == "no newline at the end"


# --------------------------------------------------------------------------- drain


async def test_closing_admission_refuses_the_queue_but_not_a_free_slot() -> None:
    m = Metrics()
    adm = Admission("m", Limits(2, 4, 5.0), m.requests_running, m.requests_waiting)
    first = await adm.acquire()
    second = await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(2)]
    await asyncio.sleep(0)
    adm.close("shutting down")
    for waiter in waiters:
        with pytest.raises(DrainingError, match="shutting down"):
            await waiter
    assert adm.waiting == 0
    with pytest.raises(DrainingError):  # no free slot: refused, not queued
        await asyncio.wait_for(adm.acquire(), 0.1)
    first.release()  # nobody is handed the slot
    assert adm.running == 1
    third = await adm.acquire()  # a free slot is still taken (the drain waits for it)
    second.release()
    third.release()
    assert adm.running == 0
