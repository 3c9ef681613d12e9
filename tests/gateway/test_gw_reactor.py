"""p2pacs's associations guard against pynetdicom's reactor race (``scu.association_handlers``):
the requestor's reactor thread must leave DIMSE messages to the call waiting for them."""

from __future__ import annotations

import time

from pynetdicom.dimse_primitives import C_ECHO
from pynetdicom.sop_class import Verification

from p2pacs.archive import Archive

from gw_helpers import associate, running_gateway


def test_requestor_reactor_leaves_responses_to_the_waiting_call(gw_archive: Archive) -> None:
    with running_gateway(gw_archive) as gw:
        assoc = associate(gw, Verification)
        assert assoc.is_established
        try:
            waiting = (1, C_ECHO())
            assoc.dimse.msg_queue.put(waiting)
            time.sleep(0.2)  # the reactor polls every millisecond: 200 chances to take it
            assert assoc.dimse.get_msg(block=False) == waiting
            assert assoc.send_c_echo().Status == 0x0000  # and the association still works
        finally:
            assoc.release()
