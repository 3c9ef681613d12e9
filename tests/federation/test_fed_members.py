"""Member states from heartbeat ages, and clock verdicts: pure, no sockets."""

from __future__ import annotations

from p2pacs.federation.catalogue import SiteRecord
from p2pacs.federation.members import Member, clock_verdict, heartbeat_interval

RECORD = SiteRecord("m", "127.0.0.1", 1, 2, "", 0, 0.0)


def test_up_suspect_down_follow_missed_heartbeats() -> None:
    down_after = 10.0
    assert heartbeat_interval(down_after) == 2.0
    assert heartbeat_interval(1.0) == 0.5 and heartbeat_interval(600.0) == 5.0
    m = Member(b"\1" * 20, RECORD, last_seen=1000.0, first_seen=900.0)
    assert m.state(down_after, 1000.0 + 1.0) == "up"
    assert m.state(down_after, 1000.0 + 3.9) == "up"  # one heartbeat late: still up
    assert m.state(down_after, 1000.0 + 4.0) == "suspect"
    assert m.is_up(down_after, 1000.0 + 9.9)  # a suspect is still live: placement holds
    assert m.state(down_after, 1000.0 + 10.0) == "down"
    assert not m.is_up(down_after, 1000.0 + 10.0)


def test_clock_verdict_takes_the_low_median() -> None:
    assert clock_verdict([], 30.0).offset is None
    assert not clock_verdict([0.1, 120.0], 30.0).off  # one member off does not blame us
    assert clock_verdict([-120.0, -119.0], 30.0).off
    assert clock_verdict([-120.0], 30.0).off  # two sites: both are told
