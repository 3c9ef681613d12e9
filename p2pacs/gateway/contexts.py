"""The acceptor's presentation contexts, copied per association without copying their UIDs.

pynetdicom deep-copies the server's supported contexts for every association it accepts
(``transport.RequestHandler._create_association``). The gateway supports 178 contexts carrying
~7,700 transfer-syntax UIDs, and a deep copy of those ``UID`` objects (``str`` subclasses,
copied one by one through ``__reduce_ex__``) took 47-66 ms: more than the whole C-FIND it was
made for (measured in bench/cfind_vs_orthanc.py). UIDs never change, so each association gets
its own context objects and transfer-syntax lists (what a handler may edit, as
``server._prefer_deliverable`` does) that share the UID strings.
"""

from __future__ import annotations

import copy
from typing import Any

from pynetdicom.presentation import PresentationContext

__all__ = ["SharedUIDContexts"]


class SharedUIDContexts(list[PresentationContext]):
    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        out = []
        for cx in self:
            mine = copy.copy(cx)  # the role and result fields are immutable values
            mine._transfer_syntax = list(cx._transfer_syntax)  # edits stay with the association
            out.append(mine)
        return out
