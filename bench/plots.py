"""PNG figures of benchmark rows (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.stats import BenchRow


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
