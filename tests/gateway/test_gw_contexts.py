"""Each association gets its own copy of the acceptor's contexts, as pynetdicom's deep copy
gave, without copying the UIDs (the copy was the largest cost of opening an association)."""

from __future__ import annotations

import copy

from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from p2pacs.archive import Archive
from p2pacs.dicom.uids import VERIFICATION
from p2pacs.gateway.contexts import SharedUIDContexts

from gw_helpers import associate, running_gateway


def _fields(cx: object) -> tuple[object, ...]:
    return tuple(getattr(cx, k) for k in (
        "context_id", "abstract_syntax", "transfer_syntax", "result", "_scu_role", "_scp_role",
        "_as_scu", "_as_scp",
    ))  # fmt: skip


def test_copy_equals_a_deep_copy_and_edits_stay_in_the_copy(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        server = gw._server
        assert server is not None and isinstance(server.contexts, SharedUIDContexts)
        ours = copy.deepcopy(server.contexts)
        theirs = copy.deepcopy(list(server.contexts))  # pynetdicom's own full copy
        assert [_fields(c) for c in ours] == [_fields(c) for c in theirs]
        assert all(a is not b for a, b in zip(ours, server.contexts, strict=True))
        ours[5].transfer_syntax = [JPEGBaseline8Bit]
        before = list(server.contexts[6].transfer_syntax)
        ours[6]._transfer_syntax.append(JPEGBaseline8Bit)
        assert server.contexts[5].transfer_syntax[0] == ExplicitVRLittleEndian
        assert server.contexts[6].transfer_syntax == before
        assert ours[7].transfer_syntax[0] is server.contexts[7].transfer_syntax[0]  # shared UID


def test_associations_still_negotiate_and_answer(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        for _ in range(3):
            assoc = associate(gw, VERIFICATION)
            assert assoc.is_established
            status = assoc.send_c_echo()
            assert status is not None and status.Status == 0
            assoc.release()
