"""Named failpoints: faults switched on by the environment, for the fault tests and chaos runs.

``P2PACS_FAILPOINTS="recovery.study=delay:0.3,transfer.receive=error:0.1,store.commit=crash"``
arms points by name; an action is ``crash`` (SIGKILL this process, as a power cut would),
``error[:P]`` (raise, with probability P, default 1), or ``delay:S`` (sleep S seconds; ``hit``
blocks its thread, ``async_hit`` awaits). Unarmed, a point costs one dictionary lookup on an
empty dict. The variable is read once, at import; ``arm`` changes it in-process (tests).

Points: ``store.commit`` (LMDB writer, before the commit), ``transfer.send`` (a blob or batch
served to a peer), ``transfer.receive`` (a blob or batch fetched from a peer), ``dht.put``,
``catalogue.publish`` (before the catalogue's copies and ``site/<id>``), ``catalogue.copy``
(before copying a member's new catalogue tree), ``repair.pull`` (one
anti-entropy pull), ``recovery.study`` (one study of the recovery queue).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from dataclasses import dataclass

from p2pacs.errors import P2PacsError

__all__ = ["POINTS", "FailpointError", "arm", "async_hit", "hit", "parse"]

ENV = "P2PACS_FAILPOINTS"
POINTS = frozenset(
    {
        "store.commit",
        "transfer.send",
        "transfer.receive",
        "dht.put",
        "catalogue.publish",
        "catalogue.copy",
        "repair.pull",
        "recovery.study",
    }
)


class FailpointError(P2PacsError):
    """An armed failpoint fired (``error`` action)."""


@dataclass(frozen=True, slots=True)
class Action:
    kind: str  # crash | error | delay
    value: float  # probability for error, seconds for delay


def parse(spec: str) -> dict[str, Action]:
    """``name=action[:arg],...`` to actions; ``ValueError`` naming what is wrong."""
    out: dict[str, Action] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, sep, action = item.partition("=")
        kind, _, arg = action.partition(":")
        if not sep or name not in POINTS:
            raise ValueError(f"{ENV}: {item!r}: unknown point (known: {', '.join(sorted(POINTS))})")
        if kind == "crash" and not arg:
            out[name] = Action("crash", 1.0)
        elif kind == "error":
            p = float(arg) if arg else 1.0
            if not 0 < p <= 1:
                raise ValueError(f"{ENV}: {item!r}: the probability must be in (0, 1]")
            out[name] = Action("error", p)
        elif kind == "delay" and arg:
            out[name] = Action("delay", max(0.0, float(arg)))
        else:
            raise ValueError(f"{ENV}: {item!r}: action must be crash, error[:P] or delay:S")
    return out


_armed: dict[str, Action] = parse(os.environ.get(ENV, ""))


def arm(spec: str) -> None:
    """Replace the armed points (in-process tests); ``""`` disarms all."""
    points = parse(spec)
    _armed.clear()
    _armed.update(points)


def _fire(name: str, action: Action, error: type[P2PacsError]) -> float:
    """Crash or raise now; return the seconds to delay (0 for none)."""
    if action.kind == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    if action.kind == "error":
        if random.random() < action.value:
            raise error(f"failpoint {name} fired")
        return 0.0
    return action.value


def hit(name: str, error: type[P2PacsError] = FailpointError) -> None:
    """A failpoint on a plain thread; ``error``: the class the code around it expects."""
    action = _armed.get(name)
    if action is not None:
        delay = _fire(name, action, error)
        if delay:
            time.sleep(delay)


async def async_hit(name: str, error: type[P2PacsError] = FailpointError) -> None:
    """A failpoint on the event loop (a delay awaits instead of blocking the loop)."""
    action = _armed.get(name)
    if action is not None:
        delay = _fire(name, action, error)
        if delay:
            await asyncio.sleep(delay)
