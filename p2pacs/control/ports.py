"""What the control plane needs of the site's parts: narrow, typed views (``Protocol``s), so
the operator API depends on these few members rather than on whole classes' internals."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Protocol

__all__ = ["HealerPort", "RecoveryPort"]


class RecoveryPort(Protocol):
    """The recovery queue as ``recover`` and ``status`` see it (``healing.recovery``)."""

    planned: asyncio.Event
    error: str
    full: str
    listeners: list[Callable[[Any], None]]

    @property
    def progress(self) -> Any: ...  # a dataclass: streamed as it is

    @property
    def pending(self) -> int: ...

    def settled(self) -> bool: ...

    def stuck(self) -> bool: ...

    def waiting(self) -> str: ...

    def given_up(self, now: float | None = None) -> dict[str, str]: ...

    async def wait_until(self, done: Callable[[], bool]) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


class HealerPort(Protocol):
    """Anti-entropy as the control plane drives it (``healing.repair``)."""

    def request(self, study_uid: str) -> bool: ...

    def snapshot(self) -> dict[str, Any]: ...
