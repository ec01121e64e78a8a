"""Personal data in text: found by pattern, kept only when a validator agrees.

A pattern alone flags too much (any 16 digits look like a card), so each kind has a validator:
payment cards pass the Luhn checksum and have a card length, IBANs their country's length and the
ISO 13616 mod-97 check, US social security numbers the SSA's rules for area, group and serial,
IP addresses Python's `ipaddress`, phone numbers Google's libphonenumber (the `phonenumbers`
package, Apache-2.0: a pattern cannot know which digit groups are dialable anywhere). The
checksums are a few lines each, written here rather than pulling a library per kind.

`find` returns the findings in order; `redact` replaces each with a label such as
`[REDACTED:EMAIL]`, so a reader sees that something was removed and what kind.
"""

from __future__ import annotations

import ipaddress
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import phonenumbers

KINDS = ("email", "phone", "payment_card", "iban", "ip_address", "us_ssn")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


# IBAN lengths by country (ISO 13616 registry, as published by SWIFT).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26,
    "IT": 27, "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20,
    "LV": 21, "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MR": 27, "MT": 31, "MU": 30, "NL": 18,
    "NO": 15, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "SA": 24,
    "SC": 31, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "ST": 25, "SV": 28, "TL": 23, "TN": 24,
    "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
}  # fmt: skip


def iban_ok(text: str) -> bool:
    iban = re.sub(r"\s", "", text).upper()
    if IBAN_LENGTHS.get(iban[:2]) != len(iban) or not iban.isalnum():
        return False
    moved = iban[4:] + iban[:4]
    return int("".join(str(int(ch, 36)) for ch in moved)) % 97 == 1


def ssn_ok(text: str) -> bool:
    area, group, serial = re.split(r"[- ]", text)
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def ip_ok(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# A validator takes what the pattern matched and returns how much of it (from the start) is the
# real thing, or None: a card followed by its security code, or an IBAN followed by "BIC", is
# matched long and kept at the length its checksum accepts.
Validator = Callable[[str], int | None]


def _whole(check: Callable[[str], bool]) -> Validator:
    return lambda text: len(text) if check(text) else None


def _card(text: str) -> int | None:
    ends = [i + 1 for i, ch in enumerate(text) if ch.isdigit()]  # end of the n-th digit
    for n in range(min(19, len(ends)), 12, -1):
        if luhn_ok("".join(ch for ch in text[: ends[n - 1]] if ch.isdigit())):
            return ends[n - 1]
    return None


def _iban(text: str) -> int | None:
    want = IBAN_LENGTHS.get(text[:2].upper())
    if want is None:
        return None
    seen = 0
    for i, ch in enumerate(text):
        seen += ch.isalnum()
        if seen == want:
            return i + 1 if iban_ok(text[: i + 1]) else None
    return None


_PATTERNS: dict[str, tuple[re.Pattern[str], Validator]] = {
    "email": (
        re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"),
        lambda text: len(text),
    ),
    # Up to 24 digits: a card number (13-19) run together with what follows it.
    "payment_card": (re.compile(r"(?<!\d)(?:\d[ .\-\u00a0]?){12,23}\d(?!\d)"), _card),
    "iban": (
        re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,4})?\b"),
        _iban,
    ),
    "us_ssn": (re.compile(r"(?<!\d)\d{3}[- ]\d{2}[- ]\d{4}(?!\d)"), _whole(ssn_ok)),
    # IPv4 may be followed by a port; IPv6 candidates are any colon-hex run, judged by ipaddress.
    "ip_address": (
        re.compile(
            r"(?<![\w.:])(?:(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)"
            r"|[0-9A-Fa-f]{0,4}(?::[0-9A-Fa-f]{0,4}){2,7}(?::\d{1,3}(?:\.\d{1,3}){3})?(?![\w:]|\.\d))"
        ),
        _whole(ip_ok),
    ),
}


def _phones(text: str, region: str) -> Iterable[Finding]:
    # max_tries: libphonenumber stops after 65,535 candidates by default, which padding a long
    # text with numbers would exhaust before the real one.
    matcher = phonenumbers.PhoneNumberMatcher(
        text, region, leniency=phonenumbers.Leniency.VALID, max_tries=sys.maxsize
    )
    for match in matcher:
        yield Finding("phone", match.start, match.end)


def find(text: str, kinds: Iterable[str] = KINDS, region: str = "US") -> list[Finding]:
    """Personal data in `text`, in order, overlaps resolved in favour of the longer finding."""
    wanted = set(kinds)
    found: list[Finding] = []
    for kind, (pattern, valid) in _PATTERNS.items():
        if kind not in wanted:
            continue
        for m in pattern.finditer(text):
            length = valid(m[0])
            if length:
                found.append(Finding(kind, m.start(), m.start() + length))
    if "phone" in wanted:
        found += _phones(text, region)
    found.sort(key=lambda f: (f.start, -(f.end - f.start)))
    kept: list[Finding] = []
    for f in found:
        if kept and f.start < kept[-1].end:
            continue  # a card number also matches as a phone: the first, longer one wins
        kept.append(f)
    return kept


def label(kind: str) -> str:
    return f"[REDACTED:{kind.upper()}]"


def redact(text: str, findings: list[Finding]) -> str:
    out, last = [], 0
    for f in findings:
        out += [text[last : f.start], label(f.kind)]
        last = f.end
    out.append(text[last:])
    return "".join(out)
