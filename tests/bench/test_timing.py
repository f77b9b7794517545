"""bench/timing.py: time ratios paired per round, and refused when their rounds disagree (issue 15)."""

import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import step  # noqa: E402
from timing import MAX_RATIO_SPREAD, paired_ratio  # noqa: E402


def test_a_load_that_comes_and_goes_cancels_in_paired_ratios():
    # round 2 ran under load: both sides of it are 10x slower
    ratio = paired_ratio([10.0, 100.0, 10.0, 10.0, 10.0], [5.0, 50.0, 5.0, 5.0, 5.0])
    assert ratio.median == 2.0 and ratio.spread == 0 and ratio.supported()


def test_a_ratio_its_rounds_cannot_support_is_refused():
    """The issue's case: the baseline timed mostly under load, the candidate mostly not. The ratio of the
    medians says 0.2x for twice the work; the per-round ratios disagree (2, 2, 0.2) and are refused."""
    candidate, baseline = [10.0, 100.0, 10.0], [5.0, 50.0, 50.0]
    assert sorted(candidate)[1] / sorted(baseline)[1] == 0.2
    ratio = paired_ratio(candidate, baseline)
    assert ratio.median == 2.0 and ratio.spread > MAX_RATIO_SPREAD and not ratio.supported()
    assert not paired_ratio([2.0], [1.0]).supported(), "one round cannot show a spread"
    with pytest.raises(ValueError, match="paired rounds needed"):
        paired_ratio([1.0, 2.0], [1.0])


def test_step_bench_reruns_then_flags_an_unsteady_ratio():
    """A scenario whose cost jumps between rounds (1 ms, then 12 ms) against a steady baseline: rerun once
    (twice the rounds), still unsupported, so flagged; the steady one is not."""
    state = {"round": 0, "after_baseline": False}

    def baseline():
        state["after_baseline"] = True
        time.sleep(0.002)

    def unsteady():
        if state["after_baseline"]:
            state["round"] += 1
            state["after_baseline"] = False
        time.sleep(0.001 if state["round"] % 2 else 0.012)

    fns = {"normal": baseline, "unsteady": unsteady}
    times, ratios = step.paired_ratios(fns, torch.device("cpu"), rep_ms=60, rounds=4, grads_to_none=[], reruns=1)
    assert len(times["normal"]) == len(times["unsteady"]) == 8, "rerun once with as many rounds again"
    assert not ratios["unsteady"].supported() and ratios["normal"].median == 1.0
