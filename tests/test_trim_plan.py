"""Trimming surplus copies, the pure decision (``placement.plan_trims``), without sockets.

Properties checked over arbitrary holder sets: a site drops a study only if R other live sites
hold it whole and it is not a placement target; and when every site applies the plan to the
same view at once, at most one copy per study goes, so never fewer than R remain (and so never
the last copies).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from p2pacs.healing.placement import placement, plan_trims, rank, trimmer

SITES = [bytes([i]) * 20 for i in range(1, 7)]
STUDY = "1.2.826.0.1.42"


def test_returning_site_makes_the_repair_copy_surplus() -> None:
    """R = 2 over three sites: the copy outside the placement is the one dropped."""
    a, b, c = SITES[:3]
    live = {a, b, c}
    targets = placement(STUDY, live, 2)
    (spare,) = live - set(targets)
    holders = {STUDY: {a, b, c}}
    for me in live:
        assert plan_trims(holders, live, me, 2) == ([STUDY] if me == spare else [])


def test_no_trim_at_or_below_r_or_with_a_holder_down() -> None:
    a, b, c = SITES[:3]
    spare = next(s for s in (a, b, c) if s not in placement(STUDY, {a, b, c}, 2))
    holders = {STUDY: {a, b, c}}
    assert plan_trims({STUDY: {a, spare}}, {a, b, c}, spare, 2) == []
    down = next(s for s in (a, b, c) if s != spare)
    assert plan_trims(holders, {a, b, c} - {down}, spare, 2) == []  # only R live copies
    assert plan_trims(holders, {a, b, c}, spare, 3) == []


def test_an_incomplete_live_copy_waits() -> None:
    """A placement target still completing its copy: the surplus one is not dropped yet."""
    a, b, c, d = SITES[:4]
    live = {a, b, c, d}
    targets = placement(STUDY, live, 2)
    whole = set(targets) | {x for x in live if x not in targets}
    spare = trimmer(STUDY, whole, live, 2)
    assert spare is not None
    assert plan_trims({STUDY: whole}, live, spare, 2) == [STUDY]
    partial_target = targets[0]
    whole_now = whole - {partial_target}
    assert plan_trims({STUDY: whole_now}, live, spare, 2, {STUDY: {partial_target}}) == []


def test_one_trimmer_at_a_time_ranked_last() -> None:
    live = set(SITES)
    targets = set(placement(STUDY, live, 2))
    surplus = [s for s in rank(STUDY, live) if s not in targets]
    holders = {STUDY: set(live)}
    chosen = [me for me in live if plan_trims(holders, live, me, 2)]
    assert chosen == [surplus[-1]]
    # once its catalogue shows the copy gone, the next one goes, down to the placement
    held = set(live)
    while (t := trimmer(STUDY, held, live, 2)) is not None:
        held.discard(t)
    assert held == targets


def test_a_stale_view_of_the_trimmer_names_the_trimmer_again() -> None:
    """A site that has not yet seen the trimmer's copy gone does not pick itself."""
    live = set(SITES[:4])
    held = set(live)
    first = trimmer(STUDY, held, live, 2)
    assert first is not None
    for me in held - {first}:
        assert plan_trims({STUDY: held}, live, me, 2) == []  # stale: still names ``first``


studies = st.lists(st.text("0123456789.", min_size=1, max_size=12), min_size=1, max_size=8)
site_sets = st.sets(st.sampled_from(SITES), min_size=0, max_size=len(SITES))


@settings(max_examples=300, deadline=None)
@given(
    uids=studies,
    data=st.data(),
    live=site_sets,
    r=st.integers(min_value=1, max_value=4),
)
def test_never_below_r_and_never_a_target(
    uids: list[str], data: st.DataObject, live: set[bytes], r: int
) -> None:
    holders = {uid: data.draw(site_sets) for uid in uids}
    partial = {uid: data.draw(site_sets) - holders[uid] for uid in uids}
    dropped: dict[str, set[bytes]] = {}
    for me in SITES:
        for uid in plan_trims(holders, live, me, r, partial):
            assert me in holders[uid] and me in live
            assert me not in placement(uid, live, r)
            assert len((holders[uid] & live) - {me}) >= r
            dropped.setdefault(uid, set()).add(me)
    for uid, gone in dropped.items():
        assert len(gone) == 1  # one per study and view: the others wait for its new catalogue
        assert len((holders[uid] & live) - gone) >= r
