"""API keys: only hashes stored, constant-time checks, revocation without restart, limits."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from inferd.errors import AuthenticationError, RateLimitError, UsageError
from inferd.server.keys import KeyFile, KeyRing


def test_create_stores_only_a_salted_hash(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("ci", rpm=None, tpm=None)
    assert key.startswith("inferd-")
    text = path.read_text()
    assert key not in text and key.split("-", 2)[2] not in text
    record = json.loads(text)["keys"][0]
    assert set(record) >= {"name", "id", "salt", "digest"}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(UsageError, match="exists"):
        KeyFile(path).create("ci", rpm=None, tpm=None)


def test_authenticate(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("app", rpm=None, tpm=None)
    ring = KeyRing(path)
    assert ring.active
    assert ring.authenticate(f"Bearer {key}").name == "app"
    for bad in (
        None,
        "",
        "Bearer",
        f"Basic {key}",
        f"Bearer {key}x",
        "Bearer inferd-00-zz",
        f"Bearer {key.replace('inferd-', 'other-')}",
    ):
        with pytest.raises(AuthenticationError):
            ring.authenticate(bad)


def test_revocation_is_seen_without_restart(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("app", rpm=None, tpm=None)
    ring = KeyRing(path)
    ring.authenticate(f"Bearer {key}")
    KeyFile(path).revoke("app")
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 1))  # a new mtime, even on coarse clocks
    with pytest.raises(AuthenticationError):
        ring.authenticate(f"Bearer {key}")
    assert not ring.active
    with pytest.raises(UsageError):
        KeyFile(path).revoke("app")


def test_requests_per_minute(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("app", rpm=2, tpm=None)
    ring = KeyRing(path)
    record = ring.authenticate(f"Bearer {key}")
    ring.admit(record, now=100.0)
    ring.admit(record, now=110.0)
    with pytest.raises(RateLimitError, match="2 requests per minute") as info:
        ring.admit(record, now=120.0)
    assert info.value.status == 429
    assert info.value.headers()["Retry-After"] == "41"  # the first request leaves the window
    ring.admit(record, now=160.5)  # 60 s after the first: room again


def test_tokens_per_minute(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    key = KeyFile(path).create("app", rpm=None, tpm=100)
    ring = KeyRing(path)
    record = ring.authenticate(f"Bearer {key}")
    ring.admit(record, now=0.0)
    ring.record_tokens(record, 120, now=1.0)
    with pytest.raises(RateLimitError, match="100 tokens per minute"):
        ring.admit(record, now=2.0)
    ring.admit(record, now=61.5)


def test_no_file_means_no_keys(tmp_path: Path) -> None:
    assert not KeyRing(tmp_path / "missing.json").active
