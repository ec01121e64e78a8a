"""API keys: a file of salted hashes, checked per request, with per-key rate limits.

A key reads `inferd-<id>-<secret>`: `id` (public, 8 characters) finds the record, `secret`
(256 random bits) is what is proven. The file keeps, per key, only a random salt and
HMAC-SHA256(salt, secret); comparison is constant-time. A slow password hash would add
milliseconds to every request for nothing: 256 random bits cannot be guessed offline anyway.

The file (`INFERD_API_KEYS_FILE`, JSON, written atomically with mode 0600) is re-read whenever its
modification time changes, so `inferd keys create/revoke` take effect on a running service without
a restart. Limits: requests per minute and tokens (prompt + completion) per minute, over a sliding
60-second window per key; over a limit -> 429 with `Retry-After` and which limit was hit.
Keys are never logged: only their names are.

Fail closed: once a `KeyRing` has seen a key (at start, or created later), `required` stays True
for the life of the process. Revoking the last key, deleting or emptying the file (a Kubernetes
Secret emptied under its mount) or writing something unreadable into it then refuses every
request (401), instead of turning authentication off; only a restart without keys, which a
non-loopback listener allows only with `--allow-unauthenticated`, serves openly again.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from inferd.errors import AuthenticationError, ConfigError, RateLimitError, UsageError

log = logging.getLogger("inferd.keys")

PREFIX = "inferd"
WINDOW_S = 60.0
# What a client is told when the service requires keys but holds none (never the file's path:
# that is for the operator's log).
NO_KEYS = (
    "no API keys are configured on this service, which requires one: every request is refused "
    "until its operator creates a key"
)


@dataclass
class KeyRecord:
    name: str
    id: str
    salt: str
    digest: str
    created: str
    rpm: int | None = None
    tpm: int | None = None
    revoked: bool = False


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode(), hashlib.sha256).hexdigest()


class KeyFile:
    """The keys file: create, list, revoke (the CLI side)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[KeyRecord]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            raise ConfigError(f"API keys file {self.path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"API keys file {self.path}: expected a JSON object")
        try:
            return [KeyRecord(**k) for k in data.get("keys", [])]
        except TypeError as exc:
            raise ConfigError(f"API keys file {self.path}: {exc}") from None

    def save(self, records: list[KeyRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = json.dumps({"keys": [asdict(r) for r in records]}, indent=2) + "\n"
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(body)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def create(self, name: str, rpm: int | None, tpm: int | None) -> str:
        records = self.load()
        if any(r.name == name and not r.revoked for r in records):
            raise UsageError(f"a key named {name!r} exists; revoke it first or pick another name")
        key_id, secret, salt = (
            secrets.token_hex(4),
            secrets.token_urlsafe(32),
            secrets.token_hex(16),
        )
        records.append(
            KeyRecord(
                name=name,
                id=key_id,
                salt=salt,
                digest=_digest(salt, secret),
                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                rpm=rpm,
                tpm=tpm,
            )
        )
        self.save(records)
        return f"{PREFIX}-{key_id}-{secret}"

    def revoke(self, name: str) -> None:
        records = self.load()
        live = [r for r in records if r.name == name and not r.revoked]
        if not live:
            raise UsageError(f"no active key named {name!r}")
        for r in live:
            r.revoked = True
        self.save(records)


@dataclass
class _Usage:
    """The last minute of one key: request times and (time, tokens) pairs."""

    requests: collections.deque[float] = field(default_factory=collections.deque)
    tokens: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def trim(self, now: float) -> None:
        while self.requests and now - self.requests[0] >= WINDOW_S:
            self.requests.popleft()
        while self.tokens and now - self.tokens[0][0] >= WINDOW_S:
            self.tokens.popleft()


class KeyRing:
    """The serving side: authenticates a request's key and applies its limits.

    The first read of the file happens here, at start: a file that cannot be read stops the
    start (ConfigError). Later reads that fail refuse every request instead (fail closed)."""

    def __init__(self, path: Path) -> None:
        self.file = KeyFile(path)
        self._mtime: float | None = None
        self._by_id: dict[str, KeyRecord] = {}
        self._usage: dict[str, _Usage] = {}
        self._required = False
        self._refresh(starting=True)

    def _refresh(self, *, starting: bool = False) -> None:
        try:
            mtime = self.file.path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime == self._mtime and not starting:
            return
        self._mtime = mtime
        try:
            records = self.file.load()
        except ConfigError as exc:
            if starting:
                raise
            log.error("%s; refusing every request until it is fixed", exc)
            records = []
        self._by_id = {r.id: r for r in records if not r.revoked}
        if self._by_id:
            self._required = True
        elif self._required:
            log.error(
                "API keys file %s holds no active key: every request is refused until a key is "
                "created (`inferd keys create`); serving without keys needs a restart",
                self.file.path,
            )

    @property
    def active(self) -> bool:
        """Whether the file holds active keys right now."""
        self._refresh()
        return bool(self._by_id)

    @property
    def required(self) -> bool:
        """Whether requests need a key: True from the first key seen, for good (fail closed)."""
        self._refresh()
        return self._required

    def authenticate(self, header: str | None) -> KeyRecord:
        self._refresh()
        if not self._by_id:
            raise AuthenticationError(NO_KEYS)
        scheme, _, token = (header or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthenticationError("missing API key: send `Authorization: Bearer <key>`")
        prefix, _, rest = token.strip().partition("-")
        key_id, _, secret = rest.partition("-")
        record = self._by_id.get(key_id) if prefix == PREFIX else None
        # Compare against something even for unknown ids, so timing says nothing about ids.
        salt, digest = (record.salt, record.digest) if record else ("00" * 16, "0" * 64)
        if not hmac.compare_digest(_digest(salt, secret), digest) or record is None:
            raise AuthenticationError("invalid API key")
        return record

    def admit(self, record: KeyRecord, now: float | None = None) -> None:
        """Count one request against the key's limits, or refuse it with 429."""
        now = time.monotonic() if now is None else now
        usage = self._usage.setdefault(record.id, _Usage())
        usage.trim(now)
        if record.rpm is not None and len(usage.requests) >= record.rpm:
            wait = WINDOW_S - (now - usage.requests[0])
            raise RateLimitError(
                f"key {record.name!r} reached its limit of {record.rpm} requests per minute",
                retry_after_s=max(1, int(wait) + 1),
            )
        if record.tpm is not None:
            used = sum(n for _, n in usage.tokens)
            if used >= record.tpm:
                wait = WINDOW_S - (now - usage.tokens[0][0])
                raise RateLimitError(
                    f"key {record.name!r} reached its limit of {record.tpm} tokens per minute "
                    f"({used} used)",
                    retry_after_s=max(1, int(wait) + 1),
                )
        usage.requests.append(now)

    def record_tokens(self, record: KeyRecord, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            self._usage.setdefault(record.id, _Usage()).tokens.append(
                (time.monotonic() if now is None else now, tokens)
            )

    def describe(self) -> list[dict[str, Any]]:
        return [
            {
                "name": r.name,
                "id": r.id,
                "created": r.created,
                "rpm": r.rpm,
                "tpm": r.tpm,
                "revoked": r.revoked,
            }
            for r in self.file.load()
        ]
