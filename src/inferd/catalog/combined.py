"""Which profiles a combined profile runs (several engines behind one model: `schema.Combined`).

Each engine of the combination runs the model's best runnable profile for that engine on this
machine's device, chosen by the same rules (or measurements) as any profile: the first engine,
which answers single users and starts first, by the latency rules; the others, which take the
crowd, by the throughput rules. A combination runs only where every engine has such a profile;
otherwise `parts` says which engine has none and why (a missing vLLM, say), and the default falls
back to the best single profile.
"""

from __future__ import annotations

from collections.abc import Callable

from inferd.catalog.profiles import Candidate
from inferd.catalog.schema import Combined
from inferd.errors import NoProfileError

# (the candidates to choose among, the goal) -> the chosen one (`profiles.select` with the
# caller's hardware and measurements bound).
Pick = Callable[[list[Candidate], str], Candidate]


def parts(combo: Combined, found: list[Candidate], pick: Pick) -> list[Candidate]:
    """The profile each engine of `combo` runs, in start order; NoProfileError naming the engine
    that has no runnable profile here."""
    chosen = []
    for index, engine in enumerate(combo.engines):
        mine = [
            c
            for c in found
            if c.profile.engine == engine and c.profile.requires.device == combo.device
        ]
        if not any(c.runnable for c in mine):
            why = "; ".join(f"{c.profile.id}: {c.reason}" for c in mine) or "no profile"
            raise NoProfileError(
                f"{combo.id} needs a runnable {combo.device} {engine} profile, and none runs "
                f"here ({why})"
            )
        chosen.append(pick(mine, "latency" if index == 0 else "throughput"))
    return chosen


def describe(combo: Combined, chosen: list[Candidate]) -> str:
    """`cpu-both = llamacpp-cpu-q8_0 + vllm-cpu-bf16`, for `why` lines and listings."""
    return f"{combo.id} = {' + '.join(c.profile.id for c in chosen)}"
