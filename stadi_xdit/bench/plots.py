"""PNG plots (matplotlib, Agg): latency per arm, and per-rank Gantt timelines of STADI arms."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from stadi_xdit.paths import save_figure

COLORS = {"single": "#7f7f7f", "uniform": "#ff7f0e", "ulysses": "#8c564b", "ring": "#bcbd22",
          "pipefusion": "#e377c2", "spatial": "#17becf", "full": "#1f77b4", "full-calls": "#6baed6",
          "full-sync": "#9467bd"}
SEGMENTS = {"compute": "#1f77b4", "emulated slowdown": "#9ecae1", "wait in collective": "#d62728",
            "exchange (transition / final gather, incl. waiting)": "#2ca02c",
            "re-plan (gather and re-slice at a sync point)": "#9467bd",
            "other (profiling sync, scheduler, prompt prep)": "#dddddd"}


def latency_bars(summaries: list[dict], path: Path, title: str) -> Path | None:
    """One panel per scenario: median latency per arm (whiskers: min-max), speedup vs uniform on top."""
    fig, axes = plt.subplots(1, len(summaries), figsize=(5.2 * len(summaries), 4.2), squeeze=False)
    for ax, summary in zip(axes[0], summaries):
        names = [n for n, a in summary["arms"].items() if a["status"] == "ok"]
        medians = [summary["arms"][n]["median_seconds"] for n in names]
        lows = [m - summary["arms"][n]["min_seconds"] for n, m in zip(names, medians)]
        highs = [summary["arms"][n]["max_seconds"] - m for n, m in zip(names, medians)]
        bars = ax.bar(range(len(names)), medians, yerr=[lows, highs], capsize=3,
                      color=[COLORS.get(n, "#333333") for n in names])
        for bar, name in zip(bars, names):
            speedup = summary["arms"][name]["speedup_vs_uniform"]
            if speedup:
                ax.annotate(f"{speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([summary["arms"][n]["label"] for n in names], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("end-to-end latency [s] (median)")
        ax.set_title(f"scenario {summary['scenario']}", fontsize=10)
        skipped = [a["label"] for a in summary["arms"].values() if a["status"] != "ok"]
        if skipped:
            ax.text(0.01, 0.98, "not run: " + ", ".join(skipped), transform=ax.transAxes, fontsize=7,
                    va="top", color="#555555")
        ax.margins(y=0.12)
    fig.suptitle(title + "  (labels: speedup vs STADI uniform)", fontsize=10)
    fig.tight_layout()
    saved = save_figure(fig, path, "plot")
    plt.close(fig)
    return saved


def _median_run(arm: dict) -> dict:
    runs = sorted(arm["runs"], key=lambda run: run["latency"])
    return runs[len(runs) // 2]


def timeline_gantt(summary: dict, path: Path, arms: tuple[str, ...] = ("uniform", "full")) -> Path | None:
    """Per-rank Gantt of the median-latency run of each STADI arm in ``arms``, on one time axis.

    Each model evaluation is drawn as its collective waits (first: the displaced K/V exchange is
    waited for at the first attention layer), its compute, then the emulated slowdown sleep; the
    gaps are scheduler steps and Python; after a rank's last bar it is idle until the run ends.
    """
    shown = [n for n in arms if summary["arms"].get(n, {}).get("status") == "ok" and summary["arms"][n]["runs"]
             and "stadi" in summary["arms"][n]["runs"][0]["ranks"][0]]
    if not shown:
        return None
    horizon = max(_median_run(summary["arms"][n])["latency"] for n in shown)
    fig, axes = plt.subplots(len(shown), 1, figsize=(10, 1.2 + 1.1 * len(shown) * 2), squeeze=False, sharex=True)
    for ax, name in zip(axes[:, 0], shown):
        arm = summary["arms"][name]
        run = _median_run(arm)
        for rank, entry in enumerate(run["ranks"]):
            y = len(run["ranks"]) - 1 - rank
            ends = [s["end"] for s in entry["stadi"]["steps"]] + [ph["end"] for ph in entry["stadi"]["phases"]]
            ax.broken_barh([(0, max(ends))], (y - 0.35, 0.7),
                           color=SEGMENTS["other (profiling sync, scheduler, prompt prep)"], linewidth=0)
            for step in entry["stadi"]["steps"]:
                compute = step["end"] - step["start"] - step["wait"] - step["emulated"]
                t = step["start"]
                for label, width in (("wait in collective", step["wait"]), ("compute", compute),
                                     ("emulated slowdown", step["emulated"])):
                    if width > 0:
                        ax.broken_barh([(t, width)], (y - 0.35, 0.7), facecolor=SEGMENTS[label],
                                       edgecolor="white", linewidth=0.3)
                    t += max(width, 0.0)
            for phase in entry["stadi"]["phases"]:
                label = ("re-plan (gather and re-slice at a sync point)" if phase["label"] == "replan"
                         else "exchange (transition / final gather, incl. waiting)")
                ax.broken_barh([(phase["start"], max(phase["end"] - phase["start"], horizon * 0.003))],
                               (y - 0.35, 0.7), color=SEGMENTS[label], linewidth=0)
            busy = entry["busy_fraction"]
            ax.text(horizon * 1.01, y, f"busy {100 * busy:.0f}%", va="center", fontsize=8)
        ax.axvline(run["latency"], color="black", linewidth=0.8, linestyle="--")
        switches = list(run.get("load_switches") or [])
        if summary.get("switch_step") is not None:  # emulated: where rank 0 reaches that base step
            steps = run["ranks"][0]["stadi"]["steps"]
            warm = sum(1 for step in steps if step["phase"] == "warmup")
            reached = [step["start"] for step in steps if step["phase"] != "warmup"
                       and warm + step["base_step"] >= summary["switch_step"]]
            switches += reached[:1]
        for switch in switches:
            ax.axvline(switch, color="#d62728", linewidth=1.2, linestyle=":")
            ax.annotate("load changes", (switch, 0.98), xycoords=("data", "axes fraction"), fontsize=7,
                        color="#d62728", xytext=(3, 0), textcoords="offset points", va="top")
        replans = run["ranks"][0]["stadi"].get("replans") or []
        replanned = (f"; re-plan at displaced step {replans[0]['offset']}: rows {replans[0]['old_rows']}->"
                     f"{replans[-1]['new_rows']}, strides {replans[0]['old_strides']}->{replans[-1]['new_strides']}"
                     if replans else "")
        ax.set_yticks(range(len(run["ranks"])))
        ax.set_yticklabels([f"rank {r}" for r in reversed(range(len(run["ranks"])))])
        ax.set_title(f"{arm['label']}: {run['latency']:.3f} s (dashed: end of run){replanned}", fontsize=10)
        ax.set_xlim(0, horizon * 1.12)
    axes[-1, 0].set_xlabel(f"seconds since the barrier release (scenario {summary['scenario']}; white space "
                           "after a rank's bars: idle until the run ends)")
    handles = [Patch(color=c, label=label) for label, c in SEGMENTS.items()]
    fig.legend(handles=handles, loc="upper center", ncol=3, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    saved = save_figure(fig, path, "plot")
    plt.close(fig)
    return saved


def per_call(summary: dict, path: Path, title: str) -> Path | None:
    """``--calls``: latency of every call of every arm, and a strip per STADI arm with the plan each call
    ran (rows / strides), marked where it changed: adaptive STADI reaching (or missing) a fixed point."""
    arms = [(name, arm) for name, arm in summary["arms"].items() if arm["status"] == "ok" and arm["runs"]]
    strips = [(name, arm) for name, arm in arms if arm.get("per_call")]
    if not arms:
        return None
    fig, axes = plt.subplots(1 + len(strips), 1, figsize=(9, 3.2 + 0.55 * len(strips)), squeeze=False,
                             gridspec_kw={"height_ratios": [4] + [1] * len(strips)}, sharex=True)
    ax = axes[0][0]
    for name, arm in arms:
        calls = ([arm["warmup_call_seconds"]] if arm.get("warmup_call_seconds") is not None else []) + arm["latencies"]
        ax.plot(range(len(calls)), calls, marker="o", ms=3, color=COLORS.get(name, "#333333"), label=arm["label"])
    ax.set_ylabel("latency [s]")
    ax.set_title(f"{title}: every call, scenario {summary['scenario']} (call 0: cold)", fontsize=10)
    ax.legend(fontsize=7, ncol=3)
    for (name, arm), row in zip(strips, axes[1:]):
        strip = row[0]
        previous = None
        for index, call in enumerate(arm["per_call"]):
            text = "/".join(map(str, call["rows"])) + "\n" + ",".join(map(str, call["strides"]))
            changed = previous is not None and (call["rows"], call["strides"]) != previous
            strip.text(index, 0.5, text, ha="center", va="center", fontsize=6,
                       color="#d62728" if changed else "#222222")
            previous = (call["rows"], call["strides"])
        strip.set_yticks([])
        strip.set_ylabel(arm["label"], rotation=0, ha="right", va="center", fontsize=7)
        strip.set_ylim(0, 1)
    axes[-1][0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1][0].set_xlabel("call (plan strips: rows per rank / strides; red: the plan changed)")
    fig.tight_layout()
    saved = save_figure(fig, path, "plot")
    plt.close(fig)
    return saved
