"""Profile selection: which of a model's profiles runs on this hardware, and why the others don't.

A profile runs when every requirement holds. Among those, the catalog's order is the preference
(the entry lists its best profile first). A named profile (`INFERD_PROFILE`) is honoured or refused
with its reasons; when none fits, the error lists every profile with what it lacks, instead of an
opaque "no profile matched".
"""

from __future__ import annotations

from dataclasses import dataclass

from inferd.catalog.hardware import Hardware
from inferd.catalog.schema import ModelEntry, Profile
from inferd.errors import NoProfileError


@dataclass(frozen=True)
class Candidate:
    profile: Profile
    reasons: tuple[str, ...]  # why it cannot run here; empty when it can

    @property
    def runnable(self) -> bool:
        return not self.reasons


def check(profile: Profile, hw: Hardware) -> Candidate:
    req, reasons = profile.requires, []
    if req.device == "gpu":
        reasons.append("needs an NVIDIA GPU; none detected")
    if req.arch and hw.cpu.arch not in req.arch:
        reasons.append(f"needs a {'/'.join(req.arch)} CPU, this is {hw.cpu.arch}")
    missing = [f for f in req.cpu_features if f not in hw.cpu.features]
    if missing:
        reasons.append(f"needs CPU features {', '.join(missing)}")
    if hw.cpu.usable_cores < req.min_cores:
        reasons.append(f"needs {req.min_cores} cores, {hw.cpu.usable_cores} usable")
    if hw.memory_gib < req.min_memory_gib:
        reasons.append(f"needs {req.min_memory_gib:g} GiB memory, {hw.memory_gib:.1f} GiB here")
    return Candidate(profile, tuple(reasons))


def candidates(model: ModelEntry, hw: Hardware) -> list[Candidate]:
    return [check(p, hw) for p in model.profiles]


def select(model: ModelEntry, hw: Hardware, wanted: str = "default") -> Profile:
    """The profile to run: `wanted` by id, or the first runnable one for `default`."""
    found = candidates(model, hw)
    if wanted != "default":
        match = next((c for c in found if c.profile.id == wanted), None)
        if match is None:
            known = ", ".join(c.profile.id for c in found)
            raise NoProfileError(f"model {model.id} has no profile {wanted!r}; it has: {known}")
        if not match.runnable:
            raise NoProfileError(f"profile {wanted} cannot run here: {'; '.join(match.reasons)}")
        return match.profile
    for c in found:
        if c.runnable:
            return c.profile
    detail = "; ".join(f"{c.profile.id}: {', '.join(c.reasons)}" for c in found)
    raise NoProfileError(
        f"no profile of {model.id} runs on this machine ({hw.summary()}): {detail}"
    )
