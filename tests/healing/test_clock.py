"""A site whose clock is off says so, in status and in its log, instead of failing silently.

The skewed site runs with libfaketime preloaded (Debian's ``faketime``): its every clock read is two
minutes ahead, so its DHT datagrams and the members' are dropped as stale on both sides.
"""

from __future__ import annotations

import glob

import pytest

from p2pacs.testbed import Testbed, wait_for

# libfaketime itself, preloaded into the site process (not the faketime wrapper, whose child
# would outlive the SIGTERM the testbed sends it)
LIBFAKETIME = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not LIBFAKETIME, reason="needs Debian's faketime"),
]

SKEW = 120.0  # seconds, four times the DHT's replay window


def test_a_site_with_a_skewed_clock_says_so(testbed: Testbed) -> None:
    clinic, lab = testbed["clinic-b"], testbed["research-lab"]
    for site in (clinic, lab):
        assert wait_for(lambda s=site: s.status()["federation"]["sites_up"] == 3, 60, 0.5)
    assert clinic.status()["federation"]["clock"]["off"] is False
    clinic.stop()
    clinic.start(env={"LD_PRELOAD": LIBFAKETIME[0], "FAKETIME": f"+{SKEW:.0f}s"})

    def clock_of(site_status: dict[str, object]) -> dict[str, object]:
        fed = site_status["federation"]
        assert isinstance(fed, dict)
        return dict(fed["clock"])

    assert wait_for(lambda: clock_of(clinic.status())["off"] is True, 60, 0.5)
    clock = clock_of(clinic.status())
    offset = clock["offset_s"]
    assert isinstance(offset, float) and abs(offset + SKEW) < 10, clock
    assert "clock differs from" in clinic.log_path.read_text()
    out = clinic.run_cli("status", timeout=60).stdout.decode()
    assert "clock off" in out, out
    # the others see which member is off, and their own clocks stay trusted (low median)
    rows = {m["name"]: m for m in lab.status()["federation"]["members"]}
    assert abs(rows["clinic-b"]["clock_offset_s"] - SKEW) < 10, rows
    assert clock_of(lab.status())["off"] is False
