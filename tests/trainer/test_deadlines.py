"""The collective and transfer deadlines and the replay bound (mecefo.deadlines), without processes."""

import pytest

from mecefo.deadlines import ASSUMED_BANDWIDTH, SLACK, Deadlines, ReplayBudget, ReplaysExhausted
from mecefo.membership import plan_step


def test_the_collective_deadline_covers_the_plans_imbalance():
    """Replica 1 sits out, replica 0 runs both shards (ndb-exact, 2 replicas): the sitter waits for two
    shards of compute beyond the floor, the neighbour only the floor."""
    plan = plan_step(2, [0], "ndb-exact", sequences=4)
    from mecefo.costs import WorkCosts

    costs = WorkCosts(neighbour=0.7)
    deadlines = Deadlines(floor_s=1.0)
    assert deadlines.collective_s(plan.load(1, costs), plan.step_time(costs)) == 1.0  # nothing measured yet
    deadlines.observe_compute(seconds=3.0, shards=2.0)  # 1.5 s per shard of work
    assert plan.load(0, costs) == 2.0 and plan.load(1, costs) == 0.0
    assert deadlines.collective_s(plan.load(1, costs), plan.step_time(costs)) == pytest.approx(1.0 + SLACK * 2 * 1.5)
    assert deadlines.collective_s(plan.load(0, costs), plan.step_time(costs)) == 1.0
    # each replay of the step waits once more; the largest unit of the recent steps is used
    deadlines.observe_compute(seconds=1.0, shards=2.0)
    assert deadlines.collective_s(0.0, 2.0, replay=2) == pytest.approx(3 * (1.0 + SLACK * 2 * 1.5))


def test_the_transfer_deadline_follows_the_message_size_and_measured_bandwidth():
    deadlines = Deadlines(floor_s=10.0)
    message = 500 << 20
    assert deadlines.transfer_s(message) == pytest.approx(10.0 + SLACK * message / ASSUMED_BANDWIDTH)
    deadlines.observe_allreduce(nbytes=1 << 30, seconds=2.0)
    deadlines.observe_allreduce(nbytes=1 << 30, seconds=8.0)  # a wait in the all-reduce: not the bandwidth
    assert deadlines.bandwidth == (1 << 30) / 2.0
    assert deadlines.transfer_s(message, replay=1) == pytest.approx(2 * (10.0 + SLACK * message / deadlines.bandwidth))
    assert Deadlines(floor_s=10.0).transfer_s(1000) == pytest.approx(10.0, rel=1e-3)  # small states: the floor


def test_replays_of_one_step_are_bounded_and_a_commit_resets_the_count():
    budget = ReplayBudget(max_replays=2)
    assert budget.replay(5) == 0
    budget.discard(5, "a peer failed")
    budget.discard(5, "a peer failed")
    assert budget.replay(5) == 2
    with pytest.raises(ReplaysExhausted, match=r"step 5 was discarded 3 times in a row \(last: timed out\).*"
                                               r"--max-replays 2"):
        budget.discard(5, "timed out")
    assert budget.replay(6) == 0, "the next step starts afresh"
    with pytest.raises(ReplaysExhausted):
        ReplayBudget(max_replays=0).discard(0, "x")
