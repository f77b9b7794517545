"""bench/fidelity.py's figures: loss curves, gradient error, time to quality (and the batch sweep's)."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean

from fidelity_page import ERROR_BOUND, PPL_TARGET_PCT, TTQ_HEADLINE, _ttq_cell
from fidelity_probe import GROUPS, _rows, probe_summary
from fidelity_runs import DEFAULT_RANK, Profile, rank_label


def _smooth(values: list[float], window: int) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


POLICY_COLORS = {"mecefo": "tab:blue", "ndb-exact": "tab:green", "shrink": "tab:red", "spread": "tab:olive",
                 "spread-orphan": "tab:purple", "mecefo:momentum": "tab:cyan", "spread-orphan:momentum": "tab:pink"}


def _save_figure(fig, out: Path) -> Path:
    """Lay out, write (creating the folder) and close a page figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_quality(result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schedules, policies, ref = result["schedules"], result["policies"], result["reference"]
    fig, axes = plt.subplots(2, len(schedules), figsize=(5 * len(schedules), 7), squeeze=False, sharex=True)
    window = 20
    ref_smooth = _smooth(ref["train_loss"], window)
    ref_val = dict(ref["val_curve"])
    for col, schedule in enumerate(schedules):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(ref_smooth, color="black", lw=1.2, label="no failure")
        for policy in policies:
            run = result["runs"][f"{schedule}/{policy}"]
            color = POLICY_COLORS.get(policy)
            top.plot(_smooth(run["train_loss"], window), color=color, lw=0.9, label=policy)
            steps = [s for s, _ in run["val_curve"]]
            bottom.plot(steps, [100 * (math.exp(v - ref_val[s]) - 1) for s, v in run["val_curve"]], "o-", ms=3,
                        color=color, label=policy)
        windows = next(iter(result["runs"][f"{schedule}/{p}"] for p in policies))["failure_windows"]
        for ax in (top, bottom):
            for _, a, b in windows:
                ax.axvspan(a - 0.5, b - 0.5, color="tab:red", alpha=0.06, lw=0)
        bottom.axhline(0, color="black", lw=0.8)
        bottom.axhline(PPL_TARGET_PCT, color="gray", ls="--", lw=0.8, label=f"+{PPL_TARGET_PCT}% (paper's worst)")
        top.set_title(f"schedule {schedule}: {len(windows)} failure windows (shaded)")
        top.set_ylabel(f"training loss ({window}-step mean)")
        bottom.set_ylabel("validation ppl vs no failure (%)")
        bottom.set_xlabel("step")
        top.set_ylim(min(ref_smooth) - 0.1, ref_smooth[min(window, len(ref_smooth) - 1)] + 0.2)  # past the first drop
    axes[0][0].legend(fontsize=8)
    axes[1][0].legend(fontsize=8)
    return _save_figure(fig, out)


def plot_probe(profile: Profile, result: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_r, ax_a) = plt.subplots(1, 3, figsize=(16, 4.6))
    plan0 = result["plans"][0]
    styles = {"total": "-", "attention": ":", "ffn": "--", "other": "-."}
    colors = dict(zip(result["plans"], ("tab:blue", "tab:orange", "tab:purple")))
    for plan in result["plans"]:
        rows = sorted(_rows(result, plan=plan, rank=DEFAULT_RANK, age=0), key=lambda r: r["step"])
        for g in ("total", *GROUPS):
            ax_t.plot([r["step"] for r in rows], [r["step_error"][g] for r in rows], styles[g], color=colors[plan],
                      marker="o", ms=3, label=f"{plan}: {g}" if plan == plan0 or g == "total" else None)
        if all("shrink_error" in r for r in rows):
            ax_t.plot([r["step"] for r in rows], [r["shrink_error"]["total"] for r in rows], "-", color=colors[plan],
                      lw=3, alpha=0.3, label=f"{plan}: shrink's gradient, total")
    ax_t.set_title(f"step gradient error through training (rank {rank_label(DEFAULT_RANK)}, fresh bases)")
    ax_t.set_xlabel("step")
    ranks = result["ranks"]
    x = list(range(len(ranks)))
    for kind, label, marker in (("step_error", f"step gradient ({plan0})", "o"), ("shard_error", "one neighbour shard", "s")):
        for g in ("ffn", "total"):
            ax_r.plot(x, [probe_summary(result, kind, fmean, plan=plan0, rank=r, age=0)[g] for r in ranks],
                      styles[g], marker=marker, label=f"{label}: {g}")
    ax_r.set_xticks(x, [rank_label(r) for r in ranks])
    ax_r.set_xlabel("rank (fraction of in_features)")
    ax_r.set_title("error vs rank (mean over probed steps, fresh bases)")
    ages = result["ages"]
    late = [s for s in range(0, profile.steps + 1, profile.probe_every) if s >= max(ages)]
    for rank in ranks:
        if rank == 1.0:
            continue
        ax_a.plot(ages, [fmean(r["shard_error"]["ffn"] for r in _rows(result, plan=plan0, rank=rank, age=a)
                               if r["step"] in late) for a in ages], marker="o", label=f"rank {rank_label(rank)}")
    ax_a.set_xlabel("age of the bases (steps) = the oldest they get with tau = age")
    ax_a.set_title(f"one neighbour shard's FFN error vs bases age (steps {late[0]}-{late[-1]})" if late else "")
    for ax in (ax_t, ax_r, ax_a):
        ax.axhline(ERROR_BOUND, color="gray", ls="--", lw=0.8)
        ax.set_ylabel("relative error")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=7)
    return _save_figure(fig, out)


def plot_ttq(t: dict, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = list(t["sources"])
    fig, axes = plt.subplots(1, len(sources), figsize=(6.5 * len(sources), 4.6), squeeze=False)
    variants = [v for v in TTQ_HEADLINE if any(r["variant"] == v for r in t["ttq"])]
    for ax, src in zip(axes[0], sources):
        width = 0.8 / len(t["ns"])
        for i, n in enumerate(t["ns"]):
            values = [(_ttq_cell(t["ttq"], src, n, "high", v) or {}).get("time_ratio", float("nan")) for v in variants]
            ax.bar([k + (i - (len(t["ns"]) - 1) / 2) * width for k in range(len(variants))], values, width,
                   label=f"n={n}")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(variants)), variants, rotation=45, ha="right", fontsize=8)
        ax.set_ylabel("wall clock to quality / failure-free")
        ax.set_title(f"high schedule, {src} costs")
        ax.set_ylim(0.9, min(3.0, max(r["time_ratio"] for r in t["ttq"] if r["source"] == src) * 1.05))
        ax.legend(fontsize=8)
    return _save_figure(fig, out)


def plot_batch(b: dict, out: Path) -> Path:
    """The batch sweep: measured drop penalty (each seed, and mean ± sd) and predicted against the global
    batch; B_simple through training of each batch size's failure-free runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_b) = plt.subplots(1, 2, figsize=(13, 4.6))
    sizes = list(b["runs"].values())
    batch = [s["batch"] for s in sizes]
    for size in sizes:
        for seed in size["seeds"].values():
            if seed["penalty"] is not None:
                ax_p.plot(size["batch"], seed["penalty"], "o", color="tab:red", alpha=0.35, ms=4)
    for key, label, color, shift in (("penalty", "measured (ladder)", "tab:red", 0.97),
                                     ("predicted_penalty", "predicted from B_simple", "tab:blue", 1.03),
                                     ("predicted_penalty_from_reference", "predicted, no-failure run's B_simple",
                                      "tab:cyan", 1.06)):
        stats = [s[key] for s in sizes]
        ax_p.errorbar([x * shift for x in batch], [s["mean"] if s else float("nan") for s in stats],
                      yerr=[s["sd"] if s else 0 for s in stats], fmt="s-", color=color, capsize=3, label=label)
    ax_p.axhline(0, color="black", lw=0.8)
    ax_p.set_xscale("log", base=2)
    ax_p.set_xticks(batch, [str(x) for x in batch])
    ax_p.set_xlabel("global batch B (sequences)")
    ax_p.set_ylabel("drop penalty (progress lost / share dropped)")
    ax_p.set_title(f"shrink under {b['schedule']}: measured vs predicted (mean ± sd, {len(b['seeds'])} seeds)")
    ax_p.legend(fontsize=8)
    for size in sizes:
        curve = next(iter(size["seeds"].values()))["b_simple_curve"]
        ax_b.plot([s for s, v in curve if v is not None], [v for _, v in curve if v is not None],
                  label=f"B = {size['batch']}")
    ax_b.set_yscale("log")
    ax_b.set_xlabel("step")
    ax_b.set_ylabel("B_simple (sequences)")
    ax_b.set_title("online noise scale, failure-free run (first seed)")
    ax_b.legend(fontsize=8)
    return _save_figure(fig, out)
