"""The seeded fault simulation (``chaos_sim.py``), short profile: 3 sites, R=2, 24 steps.

``CHAOS_SEED=N`` replays one seed (``random`` draws one); ``CHAOS_SITES``, ``CHAOS_R`` and
``CHAOS_STEPS`` change the profile. The seed is printed first, and a failure shows it with the
steps taken, the problems found and each site's log tail. ``bench/chaos.py`` runs it for longer.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from p2pacs.testbed import Testbed

from chaos_sim import Profile, Simulation

pytestmark = pytest.mark.slow

DEFAULT_SEED = 20261125


def _seed() -> int:
    raw = os.environ.get("CHAOS_SEED", "")
    if raw == "random":
        return random.SystemRandom().randrange(1 << 31)
    return int(raw) if raw else DEFAULT_SEED


def test_chaos_loses_nothing_and_restores_r(tmp_path: Path) -> None:
    seed = _seed()
    profile = Profile(
        sites=int(os.environ.get("CHAOS_SITES", "3")),
        replication=int(os.environ.get("CHAOS_R", "2")),
        steps=int(os.environ.get("CHAOS_STEPS", "24")),
    )
    print(f"chaos seed {seed}; replay: {profile.replay(seed)}")
    result = Simulation(tmp_path, seed, profile).run()
    print(result.summary())
    assert not result.problems, result.report(profile.replay(seed))
    assert result.lost == 0 and result.corrupt_served == 0 and result.unserved == 0
    assert result.seconds_to_r is not None
    assert result.faults > 0 and result.acknowledged > 0


def test_site_wiped_right_after_a_restart_recovers(tmp_path: Path) -> None:
    names = ("alpha", "bravo", "charlie")
    with Testbed(
        tmp_path / "fed", names, replication=2, down_after=3.0, repair_interval=1.0,
        recover_give_up=15.0,
    ) as bed:  # fmt: skip
        bed.start()
        bravo = bed["bravo"]
        bravo.kill()
        bravo.start()  # publishes its catalogue before the others have seen it up again
        bravo.kill()
        bravo.wipe()
        bravo.start()
        done = bravo.run_cli("recover", timeout=120)
        assert done.returncode == 0, bravo.log_tail(5)
