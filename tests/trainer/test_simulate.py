"""The failure-process simulator (mecefo.simulate), the time-to-quality model (mecefo.time_to_quality) and the
planner (mecefo.planner, mecefo-plan): identities of the trainer's schedules and plans, hot spares, and the
committed results reproduced."""

import csv
import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

import mecefo.simulate as sim
from mecefo.costs import WorkCosts
from mecefo.failures import FailureWindow, Schedule, renewal_schedule, scenario_schedule
from mecefo.membership import approximated_share, dropped_share, plan_step
from mecefo.policy import POLICIES
from mecefo.time_to_quality import QualityModel, time_to_quality

REPO = Path(__file__).resolve().parents[2]
HOURS = 300.0
SLOTS = int(HOURS * 3600 / sim.SLOT_S)


def test_failure_intervals_are_the_schedule():
    schedule = scenario_schedule("high", replicas=8, steps=SLOTS, hours=HOURS, seed=1)
    intervals = sim.failure_intervals(sim.down_spans(schedule, SLOTS), SLOTS * sim.SLOT_S)
    assert intervals[0][0] == 0 and intervals[-1][1] == SLOTS * sim.SLOT_S
    assert all(a[1] == b[0] for a, b in zip(intervals, intervals[1:]))
    for start, end, failed in intervals[::7]:
        for slot in (start / sim.SLOT_S, (start + end) // (2 * sim.SLOT_S), end / sim.SLOT_S - 1):
            assert schedule.failed_at(int(slot)) == failed
    counts = sim.down_counts(sim.down_spans(schedule, SLOTS), SLOTS * sim.SLOT_S)
    assert [(a, b, len(f)) for a, b, f in intervals] == counts


@pytest.mark.parametrize("scenario", ["low", "high"])
def test_throughput_drop_identities(scenario):
    """With no stalls: shrink loses exactly the failed replicas' share, and so does the exact floor (the full
    batch spread with no granularity over the survivors); a neighbour whose two neighbour-mode shards take
    twice a normal step halves the throughput whenever some replica is down (n=32 never loses half); one
    whose two shards take one normal step costs nothing; spreading sits between the exact floor and exact
    Neighbor-Do-Both, and its orphan-only approximation above the approximate floor."""
    schedule = scenario_schedule(scenario, replicas=32, steps=SLOTS, hours=HOURS, seed=0)
    no_stalls = sim.EventCosts()

    def drop(policy, neighbour=1.0, sequences=16):
        costs = sim.StepCosts(compute_s=0.5, work=WorkCosts(neighbour=neighbour), sequences=sequences)
        return sim.simulate_cluster(scenario, policy, costs, no_stalls, hours=HOURS, seed=0).drop_pct

    failed = 100 * schedule.failed_fraction(SLOTS)
    assert drop("shrink") == pytest.approx(failed)
    assert drop(sim.FLOOR_EXACT) == pytest.approx(failed)
    assert drop("mecefo") == pytest.approx(50 * sim.fraction_with_failure(schedule, SLOTS))
    assert drop("mecefo", neighbour=0.5) == pytest.approx(0.0, abs=1e-9)
    assert drop(sim.FLOOR_EXACT) < drop("spread") < drop("ndb-exact")
    assert drop(sim.FLOOR_APPROXIMATE, 0.7) < drop("spread-orphan", 0.7) < drop("spread")
    assert drop("spread", sequences=1) == pytest.approx(drop("ndb-exact"))  # whole shards: one extra, as NDB
    assert 0 < drop("shrink") < drop("mecefo")


def test_stalls_and_overhead():
    """Detection and heal stalls cost their seconds at the failure-free rate; per-step overhead that a
    neighbour does not lengthen shrinks its relative cost."""
    schedule = scenario_schedule("mid", replicas=32, steps=SLOTS, hours=HOURS, seed=0)
    costs = sim.StepCosts(compute_s=1.0, overhead_s=0.0, work=WorkCosts(neighbour=0.5), sequences=1)
    events = sim.EventCosts(detect_s=30.0, heal_s=6.0)
    stalled = sum(w.end < SLOTS for w in schedule.windows) * 6.0 + len(schedule.windows) * 30.0
    result = sim.simulate_cluster("mid", "mecefo", costs, events, hours=HOURS, seed=0)
    assert result.drop_pct == pytest.approx(100 * stalled / (SLOTS * sim.SLOT_S))
    half = sim.StepCosts(compute_s=1.0, work=WorkCosts(neighbour=0.5), sequences=2)
    bare = sim.simulate_cluster("mid", "neighbour-orphan", half, sim.EventCosts(), hours=HOURS, seed=0).drop_pct
    with_comm = sim.simulate_cluster("mid", "neighbour-orphan", replace(half, overhead_s=1.0), sim.EventCosts(),
                                         hours=HOURS, seed=0).drop_pct
    # while some replica is down a step takes 1.5x (no overhead) or (1 + 1.5) / 2 = 1.25x: drops 1/3 and 1/5
    assert with_comm == pytest.approx(bare * 3 / 5)


def test_restart_accounting():
    """Failures at 100 s and 250 s of 400 s; 10 s restarts, 5 s saves every 40 s of work."""
    events = sim.EventCosts(restart_s=10.0, save_s=5.0)
    # [0, 100): 2 cycles of 45 s keep 80 s; [100, 250): 140 s after the restart, 3 cycles keep 120 s;
    # [250, 400): 3 cycles keep 120 s and the last 5 s of work count at the end
    assert sim.restart_useful_fraction([100.0, 250.0], 400.0, events, 40.0) == pytest.approx(325 / 400)
    assert sim.young_daly_interval_s(2.0, 900.0) == pytest.approx(60.0)


def test_time_to_quality_model():
    """Effective steps read off the failure-free ladder (linear in log steps) and back; a policy's progress per
    step and step rate combine into the wall clock to the target, and the loss reached in the failure-free
    job's wall clock."""
    ladder = ((300, 2.0), (600, 1.8), (900, 1.7))
    quality = QualityModel({"shrink": 0.8, "spread-orphan": 0.5, "mecefo": 1.5}, ladder, 900)
    assert quality.loss_at(600) == pytest.approx(1.8) and quality.effective_steps(1.8) == pytest.approx(600)
    assert quality.effective_steps(1.75) == pytest.approx(math.exp((math.log(600) + math.log(900)) / 2))
    assert quality.loss_at(quality.effective_steps(1.93)) == pytest.approx(1.93)
    assert quality.loss_at(1800) < 1.7  # extended past the end by the last segment
    result = sim.ClusterResult("x", "high", 0, 32, shards_per_s=1.0, drop_pct=10.0, steps_per_s=0.8,
                                   free_steps_per_s=1.0, approximated_share=0.1, dropped_share=0.02)
    assert quality.efficiency("spread", result) == pytest.approx(1 - 0.8 * 0.02)  # drops pay shrink's penalty
    assert quality.efficiency("neighbour-orphan", result) == pytest.approx(1 - 0.5 * 0.1 - 0.8 * 0.02)
    assert quality.efficiency("auto", result) == quality.efficiency("spread-orphan", result)
    ttq = time_to_quality("mecefo", result, quality)
    e = 1 - 1.5 * 0.1 - 0.8 * 0.02
    assert ttq.efficiency == pytest.approx(e) and ttq.time_ratio == pytest.approx(1 / (e * 0.8))
    assert ttq.loss_at_budget == pytest.approx(quality.loss_at(e * 0.8 * 900))
    exact = sim.ClusterResult("restart", "high", 0, 32, 1.0, 5.0, 0.95, 1.0, 0.0, 0.0)
    assert time_to_quality("restart", exact, quality).time_ratio == pytest.approx(1 / 0.95)


@pytest.mark.parametrize("n,m", [(4, 1), (8, 2), (8, 16), (32, 16), (33, 3)])
def test_plan_statistics_depend_on_how_many_are_dead_not_which(n, m):
    """The simulator plans one failed set per count (mecefo.simulate.plan_stats): for every policy and count,
    random failed sets give the same step time, shards processed and shares as the canonical one."""
    rng = random.Random(n * 100 + m)
    work = WorkCosts(neighbour=0.71)
    for penalties in ((0.42, 0.48), (0.1, 1.2), (0.9, 0.05)):
        costs = sim.StepCosts(1.0, work=work, sequences=m, penalty=penalties[0], drop_penalty=penalties[1])
        for policy in POLICIES:
            for dead in range(1, n):
                stats = sim.plan_stats(costs, n, dead, policy)
                for _ in range(3):
                    failed = rng.sample(range(n), dead)
                    live = [r for r in range(n) if r not in failed] if policy != "restart" else range(n)
                    plan = plan_step(n, live, policy, sequences=m, costs=work, penalty=penalties[0],
                                     drop_penalty=penalties[1])
                    assert (plan.step_time(work), plan.processed, approximated_share(plan),
                            dropped_share(plan)) == (stats.step_time, stats.processed, stats.approximated_share,
                                                      stats.dropped_share), (policy, failed)


def test_a_spare_takes_the_place_and_the_repaired_node_joins_the_pool():
    """One spare, replace time 90 s: replica 0 fails at minute 10 (repaired at 100): the spare takes its place
    at 10 min + 90 s. Replica 1 fails at minute 20: no spare is free until replica 0's node is repaired at 100,
    so its place is empty until 100 min + 90 s. Replica 2 fails at 200 (repaired at 201): waiting for a spare
    (replica 1's node, free at 120) would be later than its own repair, so it comes back at 201."""
    schedule = Schedule([FailureWindow(0, 10, 100), FailureWindow(1, 20, 120), FailureWindow(2, 200, 201)],
                        replicas=4)
    spans = sim.down_spans(schedule, 300, spares=1, replace_s=90.0)
    assert [(s.replica, s.start_s, s.end_s) for s in spans] == [(0, 600.0, 690.0), (1, 1200.0, 6090.0),
                                                                 (2, 12000.0, 12060.0)]
    assert [(s.start_s, s.end_s) for s in sim.down_spans(schedule, 300)] == [(600.0, 6000.0), (1200.0, 7200.0),
                                                                             (12000.0, 12060.0)]


def test_spares_shorten_failures_and_zero_spares_change_nothing():
    costs = sim.StepCosts(1.0, work=WorkCosts(neighbour=0.71))
    events = sim.EventCosts(detect_s=5.0, heal_s=10.0, start_s=60.0)
    drops = [sim.simulate_cluster("high", "spread", costs, events, n=32, hours=HOURS, seed=2, spares=s)
             for s in (0, 1, 2, 4, 32)]
    assert all(a.drop_pct > b.drop_pct and a.down_share > b.down_share for a, b in zip(drops, drops[1:]))
    # with a spare for every replica each failure costs only detection, the spare's start and its heal
    schedule = scenario_schedule("high", replicas=32, steps=SLOTS, hours=HOURS, seed=2)
    assert drops[-1].down_share == pytest.approx(len(schedule.windows) * 65.0 / (32 * SLOTS * sim.SLOT_S), rel=0.02)


def test_a_node_failure_process_is_the_papers_scenario_and_the_jobs_mtbf_scales_with_n():
    high = scenario_schedule("high", replicas=16, steps=SLOTS, hours=HOURS, seed=3)
    same = renewal_schedule(16.0, 2.0, replicas=16, steps=SLOTS, hours=HOURS, seed=3)
    assert high.windows == same.windows
    process = sim.FailureProcess.scenario("high")
    assert (process.mtbf_h, process.repair_h) == (16.0, 2.0)
    assert process.job_mtbf_h(32) == 0.5 and process.job_mtbf_h(4) == 4.0
    with pytest.raises(ValueError, match="unknown failure scenario 'often'"):
        sim.FailureProcess.scenario("often")


def test_a_negative_measured_penalty_counts_as_zero():
    """A failure run that ends better than no failure measures a negative penalty (noise, seen at 300
    steps): stored as measured, planned with as 0, never a crash (issue 20)."""
    quality = QualityModel({"shrink": -0.3, "spread-orphan": -0.1}, ((300, 2.0), (600, 1.8)), 600)
    assert quality.drop_penalty == 0.0 and quality.approximation_penalty("auto") == 0.0
    from mecefo.planner import compare_policies, flop_floor_source

    result = compare_policies(flop_floor_source("tiny", 128, 16, 0.0), [8], ["high"], range(1), 50.0, quality,
                              progress=False)
    auto = next(r for r in result["ttq"] if r["variant"] == "auto")
    assert auto["efficiency"] == 1.0 and auto["time_ratio"] >= 1.0


def test_time_to_quality_needs_no_ladder():
    quality = QualityModel({"shrink": 0.5})
    result = sim.ClusterResult("shrink", "high", 0, 32, 1.0, 10.0, 1.0, 1.0, 0.0, 0.1)
    ttq = time_to_quality("shrink", result, quality)
    assert ttq.loss_at_budget is None and ttq.time_ratio == pytest.approx(1 / 0.95)


# ---- mecefo-plan ----------------------------------------------------------------------------------------

def plan(tmp_path, *argv) -> dict:
    from mecefo.plan_cli import main

    out = tmp_path / "plan.json"
    assert main([*argv, "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_mecefo_plan_reproduces_the_fidelity_pages_time_to_quality(tmp_path, capsys):
    """The paper's 32-node high schedule, LLaMA-1B at the FLOP floor (1 s steps, the GPU-scale event costs),
    3 seeds x 1000 h, the 900-step fidelity page's measured penalties: the same numbers as
    bench/fidelity.py --parts ttq committed (bench/results/fidelity_cpu-steps900.json, and its rows in
    results.csv at the CSV's 6 digits), since it is the same code."""
    committed = REPO / "bench" / "results" / "fidelity_cpu-steps900.json"
    out = plan(tmp_path, "--replicas", "32", "--schedule", "high", "--preset", "llama-1b", "--seq", "2048",
               "--step-s", "1", "--hours", "1000", "--seeds", "3", "--spares", "0", "--quality", str(committed))
    stored = json.loads(committed.read_text())["ttq"]
    drops = {r["policy"]: r for r in stored["drops"] if (r["source"], r["n"], r["scenario"]) == ("flop-floor", 32, "high")}
    ttq = {r["variant"]: r for r in stored["ttq"] if (r["source"], r["n"], r["scenario"]) == ("flop-floor", 32, "high")}
    with open(REPO / "bench" / "results" / "results.csv", newline="") as f:
        csv_rows = {r["provider"]: float(r["median"]) for r in csv.DictReader(f)
                    if r["benchmark"] == "fidelity/time-to-quality" and r["mode"] == "high,n=32"
                    and r["config"].endswith("costs=flop-floor")}
    assert len(out["rows"]) == len(POLICIES)
    for row in out["rows"]:
        assert row["drop_pct"] == drops[row["policy"]]["drop_pct"]
        assert row["time_ratio"] == ttq[row["policy"]]["time_ratio"]
        assert f"{row['time_ratio']:.6g}" == f"{csv_rows[row['policy']]:.6g}"
    assert "recommended with 0 spares: shrink" in capsys.readouterr().out


CLUSTER_CONFIG = "flop-floor,sequences=16,hours=1000,seeds=5,comm_ms=0,restart_s=600,n=32"


def test_mecefo_plan_reproduces_bench_cluster_simulate_rows(tmp_path):
    """`bench/cluster.py simulate --sources flop-floor --n 32` committed its rows (LLaMA-1B at the FLOP floor,
    5 seeds x 1000 h, time to quality from the 900-step page): mecefo-plan with the same inputs prints the same
    throughput drops and times to quality, at the CSV's 6 digits (the newest rows of that configuration)."""
    committed = REPO / "bench" / "results" / "fidelity_cpu-steps900.json"
    drops, ttq = {}, {}
    with open(REPO / "bench" / "results" / "results.csv", newline="") as f:
        for r in csv.DictReader(f):
            if r["mode"] != "high" or r["config"] != CLUSTER_CONFIG:
                continue
            if r["benchmark"] == "cluster/throughput" and r["metric"] == "throughput_drop":
                drops[r["provider"]] = float(r["median"])
            elif r["benchmark"] == "cluster/time-to-quality":
                ttq[r["provider"]] = float(r["median"])
    assert set(POLICIES) <= set(drops) and set(POLICIES) <= set(ttq), "bench/cluster.py's rows are not committed"
    out = plan(tmp_path, "--replicas", "32", "--schedule", "high", "--preset", "llama-1b", "--seq", "2048",
               "--step-s", "1", "--hours", "1000", "--seeds", "5", "--spares", "0", "--quality", str(committed))
    assert sorted(r["policy"] for r in out["rows"]) == sorted(POLICIES)
    for row in out["rows"]:
        assert f"{row['drop_pct']:.6g}" == f"{drops[row['policy']]:.6g}", row["policy"]
        assert f"{row['time_ratio']:.6g}" == f"{ttq[row['policy']]:.6g}", row["policy"]


def test_mecefo_plan_answers_for_gpus_in_groups_with_a_flop_rate_and_spares(tmp_path, capsys):
    out = plan(tmp_path, "--gpus", "64", "--group-size", "8", "--preset", "llama-1b", "--gpu-tflops", "400",
               "--mtbf-hours", "100", "--repair-hours", "4", "--hours", "50", "--seeds", "1")
    assert out["replicas"] == 8 and "node MTBF 100 h, repair 4 h" in out["failures"]
    assert sorted({r["spares"] for r in out["rows"]}) == [0, 1, 2, 4]
    for policy in POLICIES:
        by_spares = [r for r in out["rows"] if r["policy"] == policy]
        if policy != "restart":  # spares do not change checkpoint-restart's accounting
            assert by_spares[0]["drop_pct"] >= by_spares[-1]["drop_pct"]
    text = capsys.readouterr().out
    # 6 N D: ~1.3e9 params x 16 x 2048 tokens x 6 / (8 x 400e12)
    assert "TFLOP per replica per step / (8 x 400 TFLOP/s)" in text


def test_mecefo_plan_reads_the_drop_penalty_from_a_runs_noise_scale(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"noise_b_simple": 96.0, "noise_batch": 16}))
    (run / "config.json").write_text(json.dumps({"seq_len": 128}))
    out = plan(tmp_path, "--replicas", "4", "--sequences", "4", "--seq", "256", "--step-s", "2",
               "--drop-penalty", str(run), "--hours", "20", "--seeds", "1", "--spares", "0")
    # this job's batch: 4 x 4 sequences of 256 tokens = 32 of the run's 128-token sequences
    assert "drop 0.750" in capsys.readouterr().out
    assert out["rows"]


@pytest.mark.parametrize("argv,message", [
    ([], "argument --replicas: the job's size is required"),
    (["--gpus", "10", "--group-size", "4", "--step-s", "1"], "argument --gpus: 10 GPUs are not a whole number"),
    (["--replicas", "0", "--step-s", "1"], "argument --replicas: must be an integer >= 1, got 0"),
    (["--replicas", "1", "--step-s", "1"], "argument --replicas: a job of 1 replica has no survivor"),
    (["--replicas", "8"], "argument --step-s: the step time is required"),
    (["--replicas", "8", "--gpu-tflops", "300"], "argument --gpu-tflops: needs --preset"),
    (["--replicas", "8", "--step-s", "-1"], "argument --step-s: must be a positive number, got -1"),
    (["--replicas", "8", "--step-s", "x"], "argument --step-s: not a number: 'x'"),
    (["--replicas", "8", "--step-s", "1", "--mtbf-hours", "10"], "argument --mtbf-hours: needs --repair-hours"),
    (["--replicas", "8", "--step-s", "1", "--drop-penalty", "/nonexistent"],
     "argument --drop-penalty: /nonexistent is neither a number nor a run directory"),
    (["--replicas", "8", "--step-s", "1", "--drop-penalty", "-0.5"], "argument --drop-penalty: must be >= 0"),
    (["--replicas", "8", "--step-s", "1", "--spares", "-1"], "argument --spares: must be >= 0"),
    (["--replicas", "8", "--step-s", "1", "--schedule", "often"], "argument --schedule: invalid choice: 'often'"),
])
def test_mecefo_plan_bad_input_is_one_line(argv, message, capsys):
    from mecefo.plan_cli import main

    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(f"mecefo-plan: error: {message}") and err.count("\n") == 1, err
