"""Neighbour assignment, step plans and normalisers: pure functions, checked exhaustively for small n."""

from itertools import combinations

import pytest

from mecefo.membership import (POLICIES, Normalisers, assign_orphans, distance_to_live, normalisers,
                               plan_step)


def all_live_sets(max_n):
    for n in range(1, max_n + 1):
        for k in range(1, n + 1):
            for live in combinations(range(n), k):
                yield n, live


@pytest.mark.parametrize("n,live", list(all_live_sets(8)))
def test_assignment_invariants(n, live):
    owners = assign_orphans(n, live)
    dead = [r for r in range(n) if r not in live]
    assert set(owners) <= set(dead)
    assert all(o in live for o in owners.values()), "orphans go to live replicas only"
    assert len(set(owners.values())) == len(owners), "no replica runs more than one orphan"
    if len(dead) <= len(live):
        assert set(owners) == set(dead), "at most half gone: every dead shard has exactly one owner"
    else:
        assert len(owners) == len(live), "more than half gone: every live replica takes one orphan"
    assert assign_orphans(n, reversed(live)) == owners, "depends only on the set"


@pytest.mark.parametrize("n", range(2, 9))
def test_single_failure_goes_to_next_live_replica(n):
    for dead in range(n):
        live = [r for r in range(n) if r != dead]
        assert assign_orphans(n, live) == {dead: (dead + 1) % n}


def test_consecutive_failures_nearest_first():
    # 1 and 2 dead: 2 keeps its single-failure owner 3; 1 continues along the ring to 0.
    assert assign_orphans(4, [0, 3]) == {2: 3, 1: 0}
    assert assign_orphans(4, [0, 1]) == {3: 0, 2: 1}
    assert assign_orphans(8, [0, 4]) == {3: 4, 7: 0}  # two separate runs of dead replicas


def test_a_second_failure_does_not_move_the_first_assignment():
    n = 8
    first = assign_orphans(n, [r for r in range(n) if r != 2])
    both = assign_orphans(n, [r for r in range(n) if r not in (2, 5)])
    assert first == {2: 3} and both == {2: 3, 5: 6}


def test_more_than_half_gone_drops_the_farthest_shards():
    plan = plan_step(4, [0], "mecefo")
    assert plan.owners == {3: 0}
    assert plan.dropped == (1, 2)
    assert plan.processed == 2
    assert "dropped shards [1, 2]" in plan.describe()


def test_distance_to_live():
    assert distance_to_live(5, [0], 4) == 1
    assert distance_to_live(5, [0], 1) == 4
    assert distance_to_live(5, [], 1) == 5


def test_plan_no_failure_is_plain_data_parallel():
    for policy in POLICIES:
        plan = plan_step(4, range(4), policy)
        assert plan.owners == {} and plan.dropped == () and plan.dead == ()
        assert [plan.shards_of(r) for r in range(4)] == [(0,), (1,), (2,), (3,)]
        assert not any(plan.is_neighbour(r) for r in range(4))
        assert normalisers(plan, policy) == Normalisers(4, 4)
        assert plan.describe() == "all 4 replicas live"


def test_plan_one_failure():
    plan = plan_step(4, [0, 1, 3], "ndb-exact")
    assert plan.dead == (2,)
    assert plan.owners == {2: 3}
    assert plan.shards_of(3) == (3, 2) and plan.shards_of(0) == (0,) and plan.shards_of(2) == ()
    assert plan.neighbours == (3,) and plan.non_neighbours == (0, 1)
    assert plan.processed == 4

    shrink = plan_step(4, [0, 1, 3], "shrink")
    assert shrink.owners == {} and shrink.dropped == (2,) and shrink.shards_of(3) == (3,)


def test_every_shard_processed_exactly_once():
    for n, live in all_live_sets(7):
        for policy in POLICIES:
            plan = plan_step(n, live, policy)
            run = [s for r in range(n) for s in plan.shards_of(r)]
            assert len(run) == len(set(run)), (n, live, policy)
            assert sorted(run + list(plan.dropped)) == list(range(n))


@pytest.mark.parametrize("n,live", list(all_live_sets(6)))
def test_normalisers_follow_mecefo_md(n, live):
    plan = plan_step(n, live, "mecefo")
    neighbours = set(plan.owners.values())
    non_neighbours = [r for r in live if r not in neighbours]
    norms = normalisers(plan, "mecefo")
    assert norms.attention == (len(non_neighbours) or None)  # |N|: live and not a neighbour
    assert norms.rest == n - len(plan.dropped)  # every processed shard
    exact = normalisers(plan_step(n, live, "ndb-exact"), "ndb-exact")
    assert exact.attention == exact.rest == n - len(plan.dropped)
    shrink = normalisers(plan_step(n, live, "shrink"), "shrink")
    assert shrink.attention == shrink.rest == len(live)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="policy must be one of"):
        plan_step(4, [0], "bamboo")
    with pytest.raises(ValueError, match=r"live replicas must be in \[0, 4\), got \[4\]"):
        plan_step(4, [0, 4], "mecefo")
    with pytest.raises(ValueError, match="no live replica"):
        plan_step(4, [], "mecefo")
    with pytest.raises(ValueError, match="n \\(number of replicas\\) must be >= 1"):
        assign_orphans(0, [])
