"""pynetdicom's standard logging handlers, bound only where their records would be shown.

Every association pynetdicom creates (and every association server) binds four handlers that
turn each PDU and DIMSE message into log text for the ``pynetdicom`` logger, formatting it
whether or not the logger would print it: ~1.5 ms of CPU per association (the A-ASSOCIATE
summaries), and a handler on every message. p2pacs runs with that logger at WARNING unless
asked for more (``-v``/``-d``), so the handlers are bound only when the ``pynetdicom`` logger
is enabled for INFO at the moment an association (or server) is created. The intervention
handlers (pynetdicom's defaults for the events that must be answered) are always bound.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.transport import AssociationServer

__all__ = ["install"]

_LOG = logging.getLogger("pynetdicom")
_lock = threading.Lock()
_original: dict[type, Callable[[Any], None]] = {}


def _bind_when_shown(cls: type) -> Callable[[Any], None]:
    original: Callable[[Any], None] = getattr(cls, "_bind_defaults")  # noqa: B009

    def _bind_defaults(self: Any) -> None:
        if _LOG.isEnabledFor(logging.INFO):
            original(self)
            return
        for event in evt._INTERVENTION_EVENTS:
            self.bind(event, evt.get_default_handler(event))

    _original[cls] = original
    return _bind_defaults


def install() -> None:
    """Bind pynetdicom's standard log handlers only when the logger shows INFO (idempotent)."""
    with _lock:
        for cls in (Association, AssociationServer):
            if cls not in _original:
                setattr(cls, "_bind_defaults", _bind_when_shown(cls))  # noqa: B010
