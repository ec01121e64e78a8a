"""The rails a guard model judges: content safety and topic control, in NemoGuard's formats.

Content safety: the guard model gets the conversation under a fixed task prompt listing the
S1..S22 taxonomy (the format NemoGuard's content-safety models were trained on) and answers JSON,
`{"User Safety": "safe|unsafe", "Response Safety": "safe|unsafe", "Safety Categories": "..."}`.
Topic control: the operator's topic instructions as the system prompt, with NemoGuard's closing
instruction; the model answers `on-topic` or `off-topic`.

Answers are parsed and validated here; one that is not in the format is an `UnusableVerdict` (the
rail's `on_error` decides what that means). For a guard model served in this service, the request
carries the answer's JSON schema, so the engine's structured decoding keeps even a small model to
the format: it cannot make a small model's judgement any good, only readable.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

CATEGORIES = (
    "Violence",
    "Sexual",
    "Criminal Planning/Confessions",
    "Guns and Illegal Weapons",
    "Controlled/Regulated Substances",
    "Suicide and Self Harm",
    "Sexual (minor)",
    "Hate/Identity Hate",
    "PII/Privacy",
    "Harassment",
    "Threat",
    "Profanity",
    "Needs Caution",
    "Manipulation",
    "Fraud/Deception",
    "Malware",
    "High Risk Gov Decision Making",
    "Political/Misinformation/Conspiracy",
    "Copyright/Trademark/Plagiarism",
    "Unauthorized Advice",
    "Illegal Activity",
    "Immoral/Unethical",
)
_BY_NAME = {name.lower(): name for name in CATEGORIES}
_BY_CODE = {f"s{i}": name for i, name in enumerate(CATEGORIES, 1)}

SAFETY_TASK = """Task: Check if there is unsafe content in the user or agent messages in the below \
conversation in accordance with our safety policy with the below categories. Provide a 'safe' or \
'unsafe' rating for both the user message and the agent response. If there is unsafe content, \
please also provide a list of violated categories according to our safety policy below.

<BEGIN UNSAFE CONTENT CATEGORIES>
{categories}
<END UNSAFE CONTENT CATEGORIES>

<BEGIN CONVERSATION>

{conversation}

<END CONVERSATION>

Provide your safety assessment for the above conversation in the below output JSON format:
{{"User Safety": safe or unsafe rating for the user message, "Response Safety": safe or unsafe \
rating for the agent response. Omit if no agent response present. "Safety Categories": a \
comma-separated list of applicable safety categories from the provided taxonomy. Omit if all \
safe.}}

Do not include anything other than the output JSON in your response.
Output JSON: """

TOPIC_SUFFIX = """

If any of the above conditions are violated, please respond with "off-topic". Otherwise, respond \
with "on-topic". You must respond with "on-topic" or "off-topic"."""


class UnusableVerdict(ValueError):
    """The guard model's answer is not a verdict in the expected format."""


@dataclass
class Judgement:
    unsafe: bool
    categories: list[str]
    raw: str


def safety_messages(user: str, response: str | None) -> list[dict[str, str]]:
    categories = "\n".join(f"S{i}: {name}." for i, name in enumerate(CATEGORIES, 1))
    conversation = f"user: {user}"
    if response is not None:
        conversation += f"\n\nresponse: agent: {response}"
    task = SAFETY_TASK.format(categories=categories, conversation=conversation)
    return [{"role": "user", "content": task}]


def safety_schema(with_response: bool) -> dict[str, Any]:
    rating = {"type": "string", "enum": ["safe", "unsafe"]}
    properties: dict[str, Any] = {"User Safety": rating}
    if with_response:
        properties["Response Safety"] = rating
    # Codes, comma-separated: what the parser maps to names; free text lets a small model
    # ramble until max_tokens.
    code = "S([1-9]|1[0-9]|2[0-2])"
    properties["Safety Categories"] = {"type": "string", "pattern": f"^{code}(, {code}){{0,5}}$"}
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties)[:-1],
        "additionalProperties": False,
    }


def _json_object(answer: str) -> dict[str, Any]:
    """The answer's JSON object; guard models sometimes wrap it in prose or a code fence."""
    text = answer.strip()
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end < start:
        raise UnusableVerdict(f"no JSON object in the guard model's answer: {answer[:80]!r}")
    try:
        value = json.loads(text[start : end + 1])
    except ValueError:
        raise UnusableVerdict(f"the guard model's answer is not JSON: {answer[:80]!r}") from None
    if not isinstance(value, dict):
        raise UnusableVerdict(f"the guard model's answer is not an object: {answer[:80]!r}")
    return value


def _rating(verdict: dict[str, Any], key: str, answer: str) -> bool:
    value = verdict.get(key)
    if not isinstance(value, str) or value.strip().lower() not in ("safe", "unsafe"):
        raise UnusableVerdict(f'"{key}" must be "safe" or "unsafe" in {answer[:80]!r}')
    return value.strip().lower() == "unsafe"


def categories_of(value: object) -> list[str]:
    """Taxonomy names from a "Safety Categories" value: codes (S3) or names, any case; names
    outside the taxonomy (a guard model with its own) are kept as given."""
    if value is None:
        return []
    if not isinstance(value, str):
        raise UnusableVerdict('"Safety Categories" must be a comma-separated string')
    out: list[str] = []
    for part in (p.strip().rstrip(".") for p in value.split(",")):
        if not part:
            continue
        name = _BY_CODE.get(part.lower()) or _BY_NAME.get(part.lower()) or part
        if name not in out:
            out.append(name)
    return out


def parse_safety(answer: str, *, response: bool) -> Judgement:
    """The verdict on the user's message, or on the agent's response when `response`."""
    verdict = _json_object(answer)
    user_unsafe = _rating(verdict, "User Safety", answer)
    unsafe = _rating(verdict, "Response Safety", answer) if response else user_unsafe
    categories = categories_of(verdict.get("Safety Categories")) if unsafe else []
    return Judgement(unsafe, categories, answer)


def topic_messages(topics: str, conversation: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "system", "content": topics.rstrip() + TOPIC_SUFFIX}, *conversation]


TOPIC_SCHEMA: dict[str, Any] = {"type": "string", "enum": ["on-topic", "off-topic"]}
_TOPIC = re.compile(r"^\W*(on-topic|off-topic)\W*$", re.IGNORECASE)


def parse_topic(answer: str) -> Judgement:
    match = _TOPIC.match(answer.strip())
    if match is None:
        raise UnusableVerdict(f'expected "on-topic" or "off-topic", got {answer[:80]!r}')
    off = match.group(1).lower() == "off-topic"
    return Judgement(off, ["off-topic"] if off else [], answer)
