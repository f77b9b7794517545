"""bench/fidelity.py end to end on a 10-step tiny run: the numbers on the page are the runs' and the probe's.

The probe's formulas are tested in test_probe.py; here: the driver trains what it says, reads the
right weights and bases (probed step and bases age), and writes the page, the JSON and the CSV rows.
"""

import csv
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("torchft")
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import fidelity  # noqa: E402

from mecefo.checkpoint import list_checkpoints, read_checkpoint  # noqa: E402
from mecefo.config import TrainConfig  # noqa: E402
from mecefo.data import Batches, CorpusFiles  # noqa: E402
from mecefo.models import build_model  # noqa: E402
from mecefo.neighbor import MeCeFOPath  # noqa: E402
from mecefo.probe import probe, single_failure_plan  # noqa: E402
from mecefo.report import read_metrics  # noqa: E402


# the name of a run with the fixture's shape overrides: its figures, default JSON and page carry it
VARIANT = "cpu-steps10-replicas3-seq-len16-micro-batch2"


@pytest.fixture(scope="module")
def fidelity_run(tmp_path_factory, corpus_cache):
    tmp = tmp_path_factory.mktemp("fidelity")
    schedule = tmp / "failures.txt"
    schedule.write_text("1 3 8\n2 4 7\n")  # replica 1 down at steps 3-7, replica 2 too at 4-6
    out = dict(docs=tmp / "docs" / "fidelity.md", json=tmp / "fidelity.json", csv=tmp / "results.csv")
    argv = ["--steps", "10", "--replicas", "3", "--seq-len", "16", "--micro-batch", "2", "--eval-every", "5",
            "--eval-batches", "2", "--checkpoint-every", "5", "--probe-every", "5", "--taus", "5",
            "--ranks", "1/32", "--schedules", str(schedule), "--policies", "mecefo", "shrink", "--seeds", "0", "1",
            "--sweep-schedule", str(schedule), "--threads", "1", "--work-dir", str(tmp / "runs"),
            "--ladder", "5", "--ttq-n", "4", "--ttq-seeds", "1", "--ttq-hours", "20",
            "--cache-dir", str(corpus_cache)] + [a for k, v in out.items() for a in (f"--{k}", str(v))]
    assert fidelity.main(argv) == 0
    return tmp, out, json.loads(out["json"].read_text()), argv


def test_quality_numbers_are_the_runs_final_evaluations(fidelity_run):
    tmp, _, results, _ = fidelity_run
    q = results["quality"]
    assert set(q["runs"]) == {"failures.txt/mecefo", "failures.txt/shrink"}
    for key, run in q["runs"].items():
        evals = [r for r in read_metrics(run["run_dir"]) if r.get("event") == "eval"]
        assert run["val_loss"] == max(evals, key=lambda r: r["step"])["val_loss"]
        assert run["ppl_change_pct"] == pytest.approx(100 * (math.exp(run["val_loss"] - q["reference"]["val_loss"]) - 1))
        assert run["steps_under_failure"] == 5 and run["max_dead"] == 2
    assert q["runs"]["failures.txt/mecefo"]["neighbour_steps"] == 5
    assert q["runs"]["failures.txt/shrink"]["neighbour_steps"] == 0


def test_probe_reads_the_probed_weights_and_bases_of_the_right_age(fidelity_run):
    tmp, _, results, _ = fidelity_run
    p = results["probe"]
    ages = {(r["step"], r["age"]) for r in p["rows"]}
    assert ages == {(0, 0), (5, 0), (5, 5), (10, 0), (10, 5)}
    run_dir = tmp / "runs" / "none"
    cfg = TrainConfig.load(run_dir / "config.json")
    corpus = CorpusFiles(**json.loads((run_dir / "corpus.json").read_text()))
    model = build_model(cfg)
    batches = Batches(corpus, seq_len=cfg.seq_len, micro_batch=cfg.micro_batch, seed=0, vocab_size=256)
    weights = dict(list_checkpoints(run_dir / "checkpoints"))
    path = MeCeFOPath(rank=1 / 32, tau=None)
    model.load_state_dict(read_checkpoint(weights[5])["model"])
    path.prepare(model)  # bases of the step-5 weights ...
    model.load_state_dict(read_checkpoint(weights[10])["model"])  # ... probed at step 10: age 5
    want = probe(model, path, batches, 10, single_failure_plan(3))
    [row] = [r for r in p["rows"] if (r["step"], r["age"], r["rank"], r["plan"]) == (10, 5, 1 / 32, "1 of 3 dead")]
    assert row["step_error"] == pytest.approx(want.step, rel=1e-6)
    assert row["shard_error"] == pytest.approx(want.shard_mean(), rel=1e-6)
    assert row["shrink_error"] == pytest.approx(want.shrink, rel=1e-6)
    assert set(p["plans"]) == {"1 of 3 dead", "1 of 32 dead", "2 of 3 dead (failures.txt schedule's worst)"}


def test_sweep_reuses_the_default_run_and_the_page_lists_everything(fidelity_run):
    tmp, out, results, _ = fidelity_run
    runs = {(r["rank"], r["tau"]): r for r in results["sweep"]["runs"]}
    assert set(runs) == {(1 / 32, 5), (1 / 32, 200)}
    assert runs[(1 / 32, 200)]["run_dir"] == results["quality"]["runs"]["failures.txt/mecefo"]["run_dir"]
    assert runs[(1 / 32, 200)]["reused"]
    page = out["docs"].read_text()
    for needle in ("## Validation quality under failures", "## Gradient error", "## Rank / tau sweep",
                   "| failures.txt | 26.7% | 5 | 2 | shrink |", f"(fidelity/{VARIANT}_quality.png)", "| 1/32 | 5 |"):
        assert needle in page
    assert (out["docs"].parent / "fidelity" / f"{VARIANT}_quality.png").stat().st_size > 10_000
    assert (out["docs"].parent / "fidelity" / f"{VARIANT}_probe.png").stat().st_size > 10_000
    # the page says how to regenerate it: the shape overrides and non-default choices, no machine paths
    assert page.startswith(f"# Training fidelity under failures ({VARIANT})")
    assert ("`python bench/fidelity.py --steps 10 --replicas 3 --seq-len 16 --micro-batch 2 --eval-every 5 "
            "--eval-batches 2 --checkpoint-every 5 --probe-every 5 --schedules "
            f"{tmp / 'failures.txt'} --policies mecefo shrink --seeds 0 1 --ranks 1/32 --taus 5 --ladder 5 "
            "--ttq-n 4 --ttq-seeds 1 --ttq-hours 20.0`") in page
    rows = list(csv.DictReader(out["csv"].open()))
    assert {r["benchmark"] for r in rows} == {"fidelity/quality", "fidelity/seeds", "fidelity/probe", "fidelity/sweep",
                                              "fidelity/progress", "fidelity/time-to-quality"}


def test_seeds_pair_each_seeds_runs_with_its_own_reference(fidelity_run):
    tmp, out, results, _ = fidelity_run
    sd = results["seeds"]
    assert sd["seeds"] == [0, 1] and set(sd["runs"]) == {"0", "1"}
    q = results["quality"]
    for policy in ("mecefo", "shrink"):  # seed 0 is the quality part's run
        assert sd["runs"]["0"][policy]["val_ppl"] == q["runs"][f"failures.txt/{policy}"]["val_ppl"]
    one = sd["runs"]["1"]
    assert one["none"]["val_ppl"] != sd["runs"]["0"]["none"]["val_ppl"]  # other weights and data
    for policy in ("mecefo", "shrink"):
        assert one[policy]["ppl_change_pct"] == pytest.approx(100 * (one[policy]["val_ppl"] / one["none"]["val_ppl"] - 1))
    assert TrainConfig.load(tmp / "runs" / "seed1" / "failures.txt-mecefo" / "config.json").seed == 1
    changes = [sd["runs"][k]["mecefo"]["ppl_change_pct"] for k in ("0", "1")]
    mean, spread = sum(changes) / 2, abs(changes[0] - changes[1]) / 2 ** 0.5
    page = out["docs"].read_text()
    assert "## Seed to seed (failures.txt schedule)" in page
    assert f"| mean ± sd |  |  |  |  | {mean:+.2f}% ± {spread:.2f} |" in page
    rows = [r for r in csv.DictReader(out["csv"].open()) if r["benchmark"] == "fidelity/seeds"]
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, f"failures.txt,seed={k}") for p in ("mecefo", "shrink")
                                                         for k in ("0", "1")}


def test_progress_per_step_is_read_off_each_seeds_ladder(fidelity_run):
    """efficiency = E / S with L*(E) the run's final loss on its seed's failure-free ladder (5 and 10 steps,
    linear in log steps); penalty = (1 - efficiency) / share of sequences approximated (dropped for shrink)."""
    _, out, results, _ = fidelity_run
    ladder, sd, model = results["ladder"], results["seeds"], results["quality_model"]
    assert ladder["lengths"] == [5, 10]
    assert ladder["val_loss"]["0"]["10"] == sd["runs"]["0"]["none"]["val_loss"]  # the 10-step run is the reference
    for seed in ("0", "1"):
        l5, l10 = ladder["val_loss"][seed]["5"], ladder["val_loss"][seed]["10"]
        for variant, share_key in (("mecefo", "approximated_fraction"), ("shrink", "dropped_fraction")):
            run = sd["runs"][seed][variant]
            effective = math.exp(math.log(5) + (run["val_loss"] - l5) / (l10 - l5) * (math.log(10) - math.log(5)))
            assert model["efficiency"][variant]["per_seed"][seed] == pytest.approx(effective / 10)
            share = run[share_key]
            assert share > 0 and model["penalties"][variant]["per_seed"][seed] == pytest.approx((1 - effective / 10) / share)
    # replica 1 down at steps 3-7 and 2 at 4-6 of 10 (3 replicas, 2 sequences each, 60 in all): shrink drops
    # 2 sequences at 2 steps and 4 at 3; mecefo's neighbour approximates its 2 shards at all 5 (one dropped at 3)
    assert sd["runs"]["0"]["shrink"]["dropped_fraction"] == pytest.approx(16 / 60)
    assert sd["runs"]["0"]["mecefo"]["approximated_fraction"] == pytest.approx(20 / 60)
    t = results["ttq"]
    assert set(t["sources"]) == {"measured small", "flop-floor"} and t["ns"] == [4]
    assert {r["variant"] for r in t["ttq"]} >= {"shrink", "mecefo", "spread", "auto", "restart", "floor-exact"}
    # spread is exact: it loses progress only where it drops (3 of 4 down overflows max_load), at shrink's rate
    drop_penalty = model["penalties"]["shrink"]["mean"]
    for r in (r for r in t["ttq"] if r["variant"] == "spread"):
        d = next(d for d in t["drops"] if (d["source"], d["n"], d["scenario"], d["policy"])
                 == (r["source"], r["n"], r["scenario"], "spread"))
        assert r["efficiency"] == pytest.approx(1 - drop_penalty * d["dropped_share"]) and d["approximated_share"] == 0
    assert any(r["efficiency"] == 1.0 for r in t["ttq"] if r["variant"] == "spread"), "nothing dropped: full progress"
    page = out["docs"].read_text()
    assert "## Progress per step" in page and "## Time to quality" in page and "Targets (issue 12):" in page
    assert (out["docs"].parent / "fidelity" / f"{VARIANT}_ttq.png").stat().st_size > 10_000


def test_one_part_rerun_keeps_the_other_parts_results(fidelity_run):
    """--parts sweep (every run reused) re-renders the page with the stored quality and probe results."""
    tmp, out, results, argv = fidelity_run
    assert fidelity.main(argv + ["--parts", "sweep"]) == 0
    again = json.loads(out["json"].read_text())
    assert again["quality"] == results["quality"] and again["probe"] == results["probe"]
    assert "## Gradient error" in out["docs"].read_text()


def test_a_target_is_judged_on_the_whole_two_standard_error_interval():
    assert fidelity.verdict(1.0, 0.5, 4, 2.2).startswith("**met**")  # [0.5, 1.5]
    assert fidelity.verdict(5.0, 1.0, 4, 2.2).startswith("**missed**")  # [4.0, 6.0]
    assert fidelity.verdict(2.0, 1.0, 4, 2.2).startswith("**not resolved**")  # [1.0, 3.0]
    assert fidelity.verdict(-1.0, 0.0, 1, 0.0).startswith("**not resolved**")  # one seed has no spread
