"""PNG figures of benchmark rows (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from bench.stats import BenchRow

if TYPE_CHECKING:
    from bench.autoscale_sim import Timeline


def policy_label(policy: str, mode: str | None) -> str:
    """``prefix-cache [events]`` for our prefix strategies; a peer's label already names it."""
    return f"{policy} [{mode}]" if mode and mode != policy else policy


def plot_routing(rows: Sequence[BenchRow], path: str | Path) -> None:
    """TTFT p90 (log scale) and goodput against offered rate, one line per policy (and index),
    one row of panels per workload. Simulated runs are lines; live runs are markers, so a
    live point sitting on its simulated line is the confirmation it is meant to be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({row.workload for row in rows})
    figure, axes = plt.subplots(len(workloads), 2, figsize=(12, 4 * len(workloads)), squeeze=False)
    for (ttft_axis, goodput_axis), workload in zip(axes, workloads):
        series: dict[tuple[str, str, str], list[BenchRow]] = defaultdict(list)
        for row in rows:
            if row.workload == workload and row.offered_rps is not None:
                mode = getattr(row, "mode", None)
                label = policy_label(row.policy, mode)
                series[(label, getattr(row, "run", "des"), mode or "")].append(row)
        for (label, run, _), points in sorted(series.items()):
            points.sort(key=lambda r: r.offered_rps or 0.0)
            rates = [r.offered_rps for r in points]
            style = {"marker": "o", "linestyle": "-"} if run == "des" else {"marker": "x", "linestyle": "none", "markersize": 9}
            label = f"{label} ({run})"
            ttft_axis.plot(rates, [r.ttft_p90_s for r in points], label=label, **style)
            goodput_axis.plot(rates, [r.goodput_rps for r in points], label=label, **style)
        ttft_axis.set_yscale("log")
        ttft_axis.set_title(f"{workload}: TTFT p90")
        ttft_axis.set_xlabel("offered req/s")
        ttft_axis.set_ylabel("seconds (engine time)")
        goodput_axis.set_title(f"{workload}: goodput")
        goodput_axis.set_xlabel("offered req/s")
        goodput_axis.set_ylabel("req/s meeting the SLO")
        goodput_axis.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_autoscale(
    load: Mapping[str, Sequence[float]],
    needed: Mapping[str, Sequence[int]],
    timelines: Mapping[tuple[str, str], Timeline],
    bucket_s: float,
    path: str | Path,
) -> None:
    """One row of panels per workload, one panel per policy: the offered load (req/s per
    bucket, shaded, right axis) behind the replicas the policy had ready and asked for, and
    the replicas the load needed (its concurrency over the target), so a late or needless
    scale event shows as a gap between the lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = list(load)
    policies = list(dict.fromkeys(policy for _, policy in timelines))
    figure, axes = plt.subplots(
        len(workloads), len(policies), figsize=(3.6 * len(policies), 2.6 * len(workloads)), squeeze=False, sharex="row"
    )
    for row, workload in zip(axes, workloads):
        # Bucket edges, the last value repeated so that a "post" step draws the last bucket too.
        edges = [i * bucket_s for i in range(len(load[workload]) + 1)]
        rates, need = [*load[workload], load[workload][-1]], [*needed[workload], needed[workload][-1]]
        top = max(*need, *(max(t.current, default=1) for (name, _), t in timelines.items() if name == workload))
        for axis, policy in zip(row, policies):
            offered = axis.twinx()
            offered.fill_between(edges, rates, step="post", color="0.85", linewidth=0)
            offered.set_ylim(0, max(rates) * 1.1 or 1)
            offered.tick_params(labelsize="x-small")
            axis.set_zorder(offered.get_zorder() + 1)
            axis.patch.set_visible(False)
            timeline = timelines.get((workload, policy))
            if timeline is not None:
                axis.step(timeline.times, timeline.ready, where="post", label="ready", color="tab:blue")
                axis.step(timeline.times, timeline.desired, where="post", label="desired", color="tab:orange",
                          linestyle="--")  # fmt: skip
            axis.step(edges, need, where="post", label="needed", color="tab:green", linestyle=":")
            axis.set_ylim(0, top + 1)
            axis.set_xlim(0, edges[-1])  # a fleet that fell behind drains long after: not the question here
            axis.set_title(f"{workload}: {policy}", fontsize="small")
            axis.tick_params(labelsize="x-small")
        row[0].set_ylabel("replicas", fontsize="small")
        row[-1].legend(fontsize="x-small", loc="upper left")
    for axis in axes[-1]:
        axis.set_xlabel("seconds (shaded: offered req/s)", fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
