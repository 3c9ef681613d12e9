"""Rendezvous placement: deterministic, spread evenly, minimal movement when a site leaves."""

from __future__ import annotations

from collections import Counter

from p2pacs.healing.placement import likely_holders_first, placement, rank, repairer

SITES = [bytes([i]) * 20 for i in range(1, 6)]
STUDIES = [f"1.2.826.0.1.{i}" for i in range(3000)]


def test_placement_is_deterministic_and_distinct() -> None:
    for uid in STUDIES[:50]:
        chosen = placement(uid, SITES, 2)
        assert chosen == placement(uid, list(reversed(SITES)), 2)
        assert len(set(chosen)) == 2
        assert chosen == rank(uid, SITES)[:2]
    assert placement("1.2", SITES[:1], 3) == SITES[:1]
    assert placement("1.2", [], 2) == []


def test_load_spreads_evenly() -> None:
    load = Counter(site for uid in STUDIES for site in placement(uid, SITES, 2))
    expected = len(STUDIES) * 2 / len(SITES)
    assert all(abs(n - expected) < 0.1 * expected for n in load.values()), load


def test_losing_a_site_moves_only_its_studies() -> None:
    gone = SITES[2]
    survivors = [s for s in SITES if s != gone]
    for uid in STUDIES:
        before = placement(uid, SITES, 2)
        after = placement(uid, survivors, 2)
        if gone in before:
            kept = [s for s in before if s != gone]
            assert kept[0] in after and len(after) == 2
        else:
            assert after == before


def test_one_repairer_per_study() -> None:
    for uid in STUDIES[:100]:
        holders = placement(uid, SITES, 3)
        assert repairer(uid, holders) == holders[0]
        assert repairer(uid, reversed(holders)) == holders[0]
    assert repairer("1.2", []) is None


def test_plan_repairs_restores_r_once_without_stampede() -> None:
    from p2pacs.healing.placement import plan_repairs

    a, b, c, d = SITES[:4]
    studies = {f"1.2.{i}": {a, b} for i in range(200)}
    live = {a, c, d}  # b is down: every study has one live holder
    plans = {me: plan_repairs(studies, live, me, 2) for me in live}
    for uid in studies:
        pullers = [me for me, plan in plans.items() if uid in plan.pull]
        assert len(pullers) == 1 and pullers[0] in {c, d}  # exactly one new copy
        notified = [t for t, uids in plans[a].notify.items() if uid in uids]
        assert notified == pullers  # the only live holder, a, tells that site
    assert all(len(p.under_replicated) == 200 for p in plans.values())
    # nothing to do when every study has R live holders, even if a returning site adds surplus
    assert plan_repairs(studies, {a, b, c}, c, 2).pull == []
    # a study whose every holder is down is reported but cannot be repaired yet
    lost = plan_repairs({"1.9": {b}}, live, a, 2)
    assert lost.under_replicated == ["1.9"] and lost.pull == [] and lost.notify == {}


def test_a_partial_copy_is_completed_and_does_not_count_towards_r() -> None:
    from p2pacs.healing.placement import plan_repairs

    a, b, c = SITES[:3]
    complete = {"1.5": {a}}
    partial = {"1.5": {b}}  # b copied the study while it was still arriving
    plan_b = plan_repairs(complete, {a, b, c}, b, 2, partial)
    assert plan_b.pull == ["1.5"] and plan_b.under_replicated == ["1.5"]
    plan_a = plan_repairs(complete, {a, b, c}, a, 2, partial)
    assert plan_a.pull == []
    assert plan_a.notify  # a, the only complete holder, asks the best-ranked other site


def test_likely_holders_first_orders_members_by_the_first_studies() -> None:
    """A wiped site copies first the trees of the members placement puts beside it for the
    studies it fetches first; every other member follows, none twice, never itself."""
    me, members = SITES[0], SITES[1:]
    first = STUDIES[:3]
    order = likely_holders_first(first, [*members, me], me, 2)
    assert sorted(order) == sorted(members) and me not in order
    expected: list[bytes] = []
    for uid in first:
        for site in placement(uid, SITES, 2):
            if site != me and site not in expected:
                expected.append(site)
    assert order[: len(expected)] == expected
    rest = [m for m in members if m not in expected]
    assert order[len(expected) :] == rest  # in the order given
    assert likely_holders_first([], members, me, 2) == list(members)
    assert likely_holders_first(first, [], me, 2) == []
