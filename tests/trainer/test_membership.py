"""Neighbour assignment, step plans and normalisers: pure functions, checked exhaustively for small n and
as properties over random live sets for every policy."""

import random
from itertools import combinations

import pytest

from mecefo.costs import WorkCosts
from mecefo.membership import (EXACT, NEIGHBOUR, POLICIES, Normalisers, StepPlan, assign_orphans,
                               distance_to_live, normalisers, plan_step)
from mecefo.policy import PRESETS, Policy, resolve_policy


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
    assert plan.owners == {3: (0,)}
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
        assert normalisers(plan) == Normalisers(4, 4)
        assert plan.describe() == "all 4 replicas live"
        assert not plan.runs_neighbour_mode()


def test_plan_one_failure():
    plan = plan_step(4, [0, 1, 3], "ndb-exact")
    assert plan.dead == (2,)
    assert plan.owners == {2: (3,)}
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
    neighbours = {o for owners in plan.owners.values() for o in owners}
    non_neighbours = [r for r in live if r not in neighbours]
    norms = normalisers(plan)
    assert norms.attention == (len(non_neighbours) or None)  # |N|: live and not a neighbour
    assert norms.rest == n - len(plan.dropped)  # every processed shard
    exact = normalisers(plan_step(n, live, "ndb-exact"))
    assert exact.attention == exact.rest == n - len(plan.dropped)
    shrink = normalisers(plan_step(n, live, "shrink"))
    assert shrink.attention == shrink.rest == len(live)


@pytest.mark.parametrize("n,live", list(all_live_sets(6)))
def test_orphan_only_attention_counts_every_live_replicas_own_shard(n, live):
    for policy in ("neighbour-orphan", "spread-orphan"):
        plan = plan_step(n, live, policy, sequences=n)
        assert all(plan.items_of(r)[0] == (r_item := plan.items_of(r)[0]) and r_item.mode == EXACT
                   and (r_item.shard, r_item.start, r_item.stop) == (r, 0, n) for r in live), "own shard exact"
        assert all(item.mode == NEIGHBOUR for r in live for item in plan.taken_over(r)), "taken over: approximated"
        norms = normalisers(plan)
        assert norms.attention == len(live)
        assert norms.rest * n == plan.processed_sequences


def random_cases(count, max_n=12, seed=0):
    """(n, live, m) with every size of live set, m from 1 to n + 2 (spreading needs m >= n - 1 to reach everyone)."""
    rng = random.Random(seed)
    for _ in range(count):
        n = rng.randint(1, max_n)
        live = sorted(rng.sample(range(n), rng.randint(1, n)))
        yield n, live, rng.randint(1, n + 2)


COSTS = [WorkCosts(), WorkCosts(neighbour=0.5), WorkCosts(neighbour=0.95)]


@pytest.mark.parametrize("policy", POLICIES)
def test_plan_properties_over_random_live_sets(policy):
    """Every sequence runs exactly once or is dropped and reported; nobody runs above its bound; the normalisers
    count what ran; items fit a micro-batch; the plan depends only on its inputs."""
    for i, (n, live, m) in enumerate(random_cases(300, seed=hash(policy) % 1000)):
        costs = COSTS[i % len(COSTS)]
        max_load = (1.5, 2.0, 3.0)[i % 3]
        plan = plan_step(n, live, policy, sequences=m, costs=costs, max_load=max_load)
        where = (policy, n, live, m, max_load)
        assert isinstance(plan, StepPlan) and plan.live == tuple(live)
        seen = [(item.shard, j) for r in plan.live for item in plan.items_of(r) for j in range(item.start, item.stop)]
        assert len(seen) == len(set(seen)), f"a sequence runs twice: {where}"
        dropped = {(s, j) for s, a, b in plan.dropped_ranges() for j in range(a, b)}
        assert set(seen) | dropped == {(s, j) for s in range(n) for j in range(m)} and not set(seen) & dropped, where
        assert plan.dropped_sequences == len(dropped) and plan.processed_sequences == len(seen)
        assert set(plan.dropped) == {s for s in range(n) if all((s, j) in dropped for j in range(m))}
        for r in plan.live:
            items = plan.items_of(r)
            assert items[0].shard == r and items[0].start == 0 and items[0].stop == m, "own shard first, whole"
            assert all(0 < item.sequences <= m for item in items), "every micro-batch at most one shard"
            assert all(item.shard not in plan.live for item in items[1:]), "only dead shards are taken over"
            if plan.policy.takeover == "neighbour":
                assert len(items) <= 2 and all(item.sequences == m for item in items), where
            if plan.policy.takeover == "spread":
                assert sum(item.sequences for item in items) <= max(m, int(max_load * m + 1e-9)), where
            if plan.policy.takeover == "drop":
                assert len(items) == 1
        if not plan.dead:
            assert plan.dropped_sequences == 0 and not plan.runs_neighbour_mode()
        exact = sum(item.sequences for r in plan.live for item in plan.items_of(r) if item.mode == EXACT)
        norms = plan.normalisers()
        assert norms.rest == pytest.approx(len(seen) / m, abs=1e-12)
        assert norms.attention == (pytest.approx(exact / m, abs=1e-12) if exact else None)
        again = plan_step(n, list(reversed(live)), policy, sequences=m, costs=costs, max_load=max_load)
        assert again == plan, f"depends only on the set: {where}"


def test_spreading_balances_load_and_keeps_the_batch():
    # 1 of 8 dead, 16 sequences per shard: 16 over 7 survivors, 3 or 2 each (ring order after the dead shard)
    plan = plan_step(8, [0, 1, 2, 4, 5, 6, 7], "spread", sequences=16)
    counts = {r: sum(i.sequences for i in plan.taken_over(r)) for r in plan.live}
    assert sorted(counts.values()) == [2, 2, 2, 2, 2, 3, 3] and counts[4] == 3 and counts[5] == 3
    assert plan.dropped_sequences == 0 and plan.normalisers() == Normalisers(8.0, 8.0)
    assert plan.step_time(WorkCosts()) == pytest.approx(19 / 16)
    # spread + orphan-only: the same sequences, approximated; the exact ones still feed attention
    orphan = plan_step(8, [0, 1, 2, 4, 5, 6, 7], "spread-orphan", sequences=16)
    same_ranges = {r: [(i.shard, i.start, i.stop) for i in items] for r, items in orphan.work.items()}
    assert same_ranges == {r: [(i.shard, i.start, i.stop) for i in items] for r, items in plan.work.items()}
    assert orphan.normalisers() == Normalisers(7.0, 8.0)
    assert orphan.step_time(WorkCosts(neighbour=0.5)) == pytest.approx((16 + 3 * 0.5) / 16)
    # the paper's neighbour takeover of the same failure: one replica runs two shards
    mecefo = plan_step(8, [0, 1, 2, 4, 5, 6, 7], "mecefo", sequences=16)
    assert mecefo.step_time(WorkCosts(neighbour=0.7)) == pytest.approx(1.4)


def test_spreading_bound_drops_and_reports():
    plan = plan_step(4, [0], "spread", sequences=3, max_load=2.0)  # one survivor, room for one more shard
    assert plan.processed_sequences == 6 and plan.dropped == (2, 3) and plan.dropped_ranges() == [(2, 0, 3), (3, 0, 3)]
    assert "dropped shards [2, 3] (global batch 6/12 sequences)" in plan.describe()
    wide = plan_step(4, [0], "spread", sequences=3, max_load=4.0)
    assert wide.dropped_sequences == 0 and wide.normalisers() == Normalisers(4.0, 4.0)
    partial = plan_step(3, [0], "spread", sequences=4, max_load=1.5)  # room for 2 of the 8 orphan sequences
    assert partial.processed_sequences == 6 and partial.dropped == (2,) and partial.dropped_ranges() == [(1, 2, 4), (2, 0, 4)]
    assert "dropped shards [2] and 1[2:4]" in partial.describe()


def test_auto_minimises_time_per_unit_of_progress():
    live = [r for r in range(32) if r != 5]  # 1 of 32 down, 16 sequences per shard
    costs = WorkCosts(neighbour=0.7)
    exact = plan_step(32, live, "spread", sequences=16, costs=costs)
    orphan = plan_step(32, live, "spread-orphan", sequences=16, costs=costs)
    assert exact.step_time(costs) == pytest.approx(17 / 16) and orphan.step_time(costs) == pytest.approx(16.7 / 16)

    def auto(penalty, drop_penalty=3.0, **kw):
        return plan_step(32, live, "auto", sequences=16, costs=kw.pop("costs", costs), penalty=penalty,
                         drop_penalty=drop_penalty, **kw)

    # orphan: 16 of 512 sequences approximated, 1.8% faster: worth it if that costs less than 1.8% of the progress
    chosen = auto(1.0)  # costs 3.1%: exact
    assert chosen.policy == PRESETS["spread"] and chosen.work == exact.work
    assert "auto chose spread 1.062x, 0.0% approximated, 0.0% dropped" in chosen.reason
    assert "spread-orphan" in chosen.reason and "shrink" in chosen.reason
    assert auto(0.3).policy == PRESETS["spread-orphan"] and auto(0.0).policy == PRESETS["spread-orphan"]
    # dropping the shard: step 1.0, 1/32 of the batch lost: the best plan if that loses little progress
    assert auto(1.0, drop_penalty=2.0).policy == PRESETS["spread"]  # 1/(1 - 2/32) = 1.067 > 1.0625
    assert auto(1.0, drop_penalty=1.0).policy == PRESETS["shrink"]  # 1/(1 - 1/32) = 1.032 < 1.0625
    # a tie goes to the plan dropping less, then to the exact one
    assert auto(0.0, costs=WorkCosts(neighbour=1.0)).policy == PRESETS["spread"]
    # 3 of 8 down, 2 sequences each: spreading cannot even out 6 sequences over 5 replicas
    live = [0, 1, 2, 3, 4]
    chosen = plan_step(8, live, "auto", sequences=2, costs=costs, penalty=0.2, drop_penalty=3.0)  # 2.0 vs 1.838
    assert chosen.policy == PRESETS["spread-orphan"] and chosen.predicted == pytest.approx((2 + 2 * 0.7) / 2)
    assert plan_step(8, live, "auto", sequences=2, costs=costs, penalty=1.0, drop_penalty=3.0).policy == PRESETS["spread"]
    # takeover fixed to neighbour, approximation left to auto
    neighbour_auto = resolve_policy("auto", takeover="neighbour")
    assert plan_step(8, [0, 1, 2, 3, 4, 5, 6], neighbour_auto, sequences=2, costs=costs,
                     penalty=0.1).policy == PRESETS["neighbour-orphan"]
    # nobody dead: the plain plan, no reason to give
    assert plan_step(4, range(4), "auto", sequences=2).reason == ""
    with pytest.raises(ValueError, match="penalty and drop_penalty must be >= 0"):
        plan_step(4, [0], "auto", penalty=-1)


def test_auto_drops_only_what_no_candidate_can_keep_unless_dropping_is_cheap():
    # 3 of 4 down, bound 2 shards: every takeover drops 2 of the 3 dead shards; the one taken over runs exactly
    plan = plan_step(4, [0], "auto", sequences=4, max_load=2.0, drop_penalty=1.2)  # shrink: progress < 0
    assert plan.dropped_sequences == 8 and plan.policy == PRESETS["spread"]
    tie = plan_step(4, [0], "auto", sequences=4, max_load=2.0, drop_penalty=1.0)  # 2 / (1 - 1/2) = 1 / (1 - 3/4)
    assert tie.dropped_sequences == 8 and tie.policy == PRESETS["spread"]
    wide = plan_step(4, [0], "auto", sequences=4, max_load=4.0, drop_penalty=1.0)
    assert wide.dropped_sequences == 0 and wide.policy.takeover == "spread"  # 4.0 vs 1 / (1 - 3/4) = 4.0: a tie
    cheap = plan_step(4, [0], "auto", sequences=4, max_load=4.0, drop_penalty=0.5)
    assert cheap.policy == PRESETS["shrink"]  # 1 / (1 - 0.5 x 3/4) = 1.6 < 4.0


def test_policies_compose():
    assert resolve_policy("mecefo") == Policy("neighbour", "both")
    assert resolve_policy("mecefo", takeover="spread") == Policy("spread", "both")
    assert resolve_policy("spread", approximate="orphan").name == "spread-orphan"
    assert resolve_policy("shrink", approximate="none").name == "shrink"
    assert Policy("spread", "both").name == "spread+both"
    assert PRESETS["restart"].restart and not PRESETS["restart"].may_approximate
    with pytest.raises(ValueError, match="takeover 'drop' takes no work over"):
        resolve_policy("shrink", approximate="orphan")
    with pytest.raises(ValueError, match="restart restarts the whole job"):
        resolve_policy("restart", takeover="spread")
    with pytest.raises(ValueError, match="takeover must be one of"):
        Policy("bamboo", "none")


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="policy must be one of"):
        plan_step(4, [0], "bamboo")
    with pytest.raises(ValueError, match=r"live replicas must be in \[0, 4\), got \[4\]"):
        plan_step(4, [0, 4], "mecefo")
    with pytest.raises(ValueError, match="no live replica"):
        plan_step(4, [], "mecefo")
    with pytest.raises(ValueError, match="sequences \\(per shard\\) must be an int >= 1"):
        plan_step(4, [0], "spread", sequences=0)
    with pytest.raises(ValueError, match="max_load must be >= 1"):
        plan_step(4, [0], "spread", max_load=0.5)
    with pytest.raises(ValueError, match="WorkCosts.neighbour must be > 0"):
        WorkCosts(neighbour=0)
    with pytest.raises(ValueError, match="n \\(number of replicas\\) must be >= 1"):
        assign_orphans(0, [])
