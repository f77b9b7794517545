"""Metrics files, the summary and the plot, from a hand-written run directory."""

import json

import pytest

from mecefo.config import TrainConfig
from mecefo.report import MetricsWriter, failure_spans, format_summary, metrics_path, plot, read_metrics, summarize


def record(step, replica, live, step_s=0.5):
    return dict(step=step, replica=replica, live=live, members=live, loss=5.0 - 0.1 * step, tokens=100 * len(live),
                step_s=step_s, tokens_per_s=100 * len(live) / step_s, compute_s=0.1, dropped=[], neighbours={},
                quorum_end=1000.0 + step, policy="shrink", plan="all live" if len(live) == 2 else "dead [1]; shrink")


def test_summary_and_plot(tmp_path):
    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=6).save(tmp_path / "config.json")
    live = {0: [0, 1], 1: [0, 1], 2: [0], 3: [0], 4: [0, 1], 5: [0, 1]}
    for replica in (0, 1):
        writer = MetricsWriter(metrics_path(tmp_path, replica))
        for step, members in live.items():
            if replica in members:
                writer.write(**record(step, replica, members, step_s=1.0 if len(members) == 1 else 0.5))
        writer.close()
    with open(metrics_path(tmp_path, 0), "a") as f:
        f.write(json.dumps({"event": "eval", "step": 6, "val_loss": 2.0, "val_ppl": 7.39, "replica": 0}) + "\n")
        f.write('{"step": 7, "cut short by a ki')  # a kill mid-write leaves half a line

    records = read_metrics(tmp_path)
    assert len([r for r in records if "event" not in r]) == 10
    summary = summarize(tmp_path)
    assert summary["steps_done"] == 6 and summary["steps_under_failure"] == 2
    assert summary["tokens_per_s_no_failure"] == 400 and summary["tokens_per_s_under_failure"] == 100
    assert summary["throughput_drop_pct"] == 75 and summary["max_dead_at_once"] == 1
    assert summary["val_loss"] == 2.0
    text = format_summary(summary)
    assert "throughput drop under failure" in text and "75 %" in text
    assert summary["noise_b_simple"] is None and summary["noise_samples"] == 0  # records without the noise scale
    assert plot(tmp_path).stat().st_size > 10_000


def test_summary_and_plot_of_the_noise_scale(tmp_path):
    """The summary's noise scale is the last measured step's; the plot gets its panel (and auto's beliefs)."""
    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=4).save(tmp_path / "config.json")
    writer = MetricsWriter(metrics_path(tmp_path, 0))
    for step in range(4):
        b_simple = [None, 2.0, 4.0, 8.0][step]
        writer.write(**record(step, 0, [0, 1]), noise_b_simple=b_simple, noise_batch=8, noise_samples=step,
                     noise_drop_penalty=None if b_simple is None else b_simple / (8 + b_simple),
                     auto_drop_penalty=0.48 if step < 2 else b_simple / (8 + b_simple))
    writer.close()
    summary = summarize(tmp_path)
    assert (summary["noise_b_simple"], summary["noise_batch"], summary["noise_samples"]) == (8.0, 8, 3)
    assert summary["noise_drop_penalty"] == 0.5
    assert "8 sequences at a batch of 8 (0.5; 3 steps measured)" in format_summary(summary)
    assert plot(tmp_path).stat().st_size > 10_000


def test_failure_spans():
    series = [{"step": s, "live": live} for s, live in enumerate([[0, 1], [0], [0], [0, 1], [1], [1]])]
    assert failure_spans(series, 2) == [(1, 3), (4, 6)]


def test_a_relaunch_leaves_one_record_per_step_and_counts_its_own_events(tmp_path):
    """Steps 2-3 committed in generation 0, then redone after a relaunch from checkpoint 2 in generation 1:
    the series keeps generation 1's, steps_redone counts them, and events before the launch are not counted."""
    from mecefo.report import step_series

    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=5).save(tmp_path / "config.json")
    with open(tmp_path / "events.jsonl", "w") as f:
        f.write(json.dumps({"event": "launch", "generation": 0, "time": 10.0}) + "\n")
        f.write(json.dumps({"event": "launch", "generation": 1, "time": 20.0}) + "\n")
    writer = MetricsWriter(metrics_path(tmp_path, 0))
    writer.write(event="checkpoint", replica=0, step=2, seconds=0.1, time=11.0)
    for generation, steps, t0 in ((0, range(0, 4), 12.0), (1, range(2, 5), 21.0)):
        for step in steps:
            writer.write(**record(step, 0, [0, 1]), generation=generation, loss_tag=generation, time=t0 + step)
    writer.write(event="checkpoint", replica=0, step=5, seconds=0.1, time=30.0)
    writer.close()
    series = step_series(read_metrics(tmp_path))
    assert [(r["step"], r["generation"]) for r in series] == [(0, 0), (1, 0), (2, 1), (3, 1), (4, 1)]
    summary = summarize(tmp_path)
    assert summary["steps_done"] == 5 and summary["steps_redone"] == 2 and summary["checkpoints"] == 1


def test_report_command_summarises_a_group_job_by_its_slowest_rank(tmp_path, capsys):
    """python -m mecefo.report RUN_DIR: a group job (no launcher) gets summary.json / .txt / plot.png; a heal of
    group 1 (2 ranks) lasts as long as its slower rank's; a directory that is not a run is one line, exit 2."""
    from mecefo.report import main, ranks_per_group

    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=4).save(tmp_path / "config.json")
    assert ranks_per_group(tmp_path) == 1
    writer, rank1 = MetricsWriter(metrics_path(tmp_path, 0)), MetricsWriter(metrics_path(tmp_path, 1))
    other = MetricsWriter(tmp_path / "metrics" / "ranks" / "replica_1_rank_1.jsonl")
    for step in range(4):
        writer.write(**record(step, 0, [0, 1]), time=100.0 + step)
    rank1.write(event="healed", replica=1, step=2, seconds=0.5, time=102.0)
    other.write(event="healed", replica=1, step=2, seconds=1.25, time=102.1)
    for w in (writer, rank1, other):
        w.close()
    assert ranks_per_group(tmp_path) == 2
    assert main([str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["heals"] == 1 and summary["heal_s_mean"] == 1.25 and summary["steps_done"] == 4
    assert "2 groups x 2 ranks" in capsys.readouterr().out and (tmp_path / "plot.png").is_file()
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "absent")])
    assert exit_.value.code == 2 and capsys.readouterr().err.count("\n") == 1


def test_a_resumed_group_job_counts_redone_steps_and_the_current_launchs_events(tmp_path):
    """A group job (no supervisor, no events.jsonl) resumed from checkpoint 2 in generation 1: the series keeps
    generation 1's copies of steps 2-3, steps_redone counts them, and the event counts start with the first
    process of generation 1 (its checkpoint, not generation 0's)."""
    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=5).save(tmp_path / "config.json")
    writers = {g: MetricsWriter(metrics_path(tmp_path, g)) for g in (0, 1)}
    for generation, steps, t0 in ((0, range(0, 4), 10.0), (1, range(2, 5), 20.0)):
        for g, w in writers.items():
            w.write(event="start", replica=g, generation=generation, init_s=1.0, time=t0 + 0.1 * g)
        for step in steps:
            for g, w in writers.items():
                w.write(**record(step, g, [0, 1]), generation=generation, time=t0 + 1 + step)
        writers[0].write(event="checkpoint", replica=0, step=steps[-1] + 1, seconds=0.1, time=t0 + 9)
    for w in writers.values():
        w.close()
    summary = summarize(tmp_path)
    assert summary["steps_done"] == 5 and summary["steps_redone"] == 2
    assert summary["checkpoints"] == 1 and summary["tokens"] == 5 * 200
    from mecefo.report import step_series

    assert [r["generation"] for r in step_series(read_metrics(tmp_path))] == [0, 0, 1, 1, 1]


def test_report_complete_says_whether_the_last_step_is_committed(tmp_path, capsys):
    """python -m mecefo.report --complete RUN_DIR (asked by the SLURM recipe): exit 0 once a record of the run's
    last step is in the metrics, 1 before, 2 for a directory that is not a run; writes nothing."""
    from mecefo.report import main

    with pytest.raises(SystemExit) as exit_:
        main(["--complete", str(tmp_path)])
    assert exit_.value.code == 2
    TrainConfig(run_dir=str(tmp_path), replicas=2, steps=3).save(tmp_path / "config.json")
    assert main(["--complete", str(tmp_path)]) == 1 and "incomplete: no step committed" in capsys.readouterr().out
    writer = MetricsWriter(metrics_path(tmp_path, 1))
    writer.write(**record(1, 1, [1]))
    writer.write(event="eval", replica=1, step=2, val_loss=1.0)  # an event of step 2 is not step 2 committed
    assert main(["--complete", str(tmp_path)]) == 1
    assert "last committed step 1, the run's last is 2" in capsys.readouterr().out
    writer.write(**record(2, 1, [1]))
    writer.close()
    assert main(["--complete", str(tmp_path)]) == 0 and "complete: its last step (2) is committed" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "metrics"]
