"""PNG figures of benchmark rows (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from bench.stats import BenchRow


def plot_routing(rows: Sequence[BenchRow], path: str | Path) -> None:
    """TTFT p90 (log scale) and goodput against offered rate, one line per policy and mode,
    one row of panels per workload. Simulated runs are lines; live runs are markers, so a
    live point sitting on its simulated line is the confirmation it is meant to be."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = sorted({row.workload for row in rows})
    figure, axes = plt.subplots(len(workloads), 2, figsize=(12, 4 * len(workloads)), squeeze=False)
    for (ttft_axis, goodput_axis), workload in zip(axes, workloads):
        series: dict[tuple[str, str], list[BenchRow]] = defaultdict(list)
        for row in rows:
            if row.workload == workload and row.offered_rps is not None:
                series[(row.policy, getattr(row, "mode", "des"))].append(row)
        for (policy, mode), points in sorted(series.items()):
            points.sort(key=lambda r: r.offered_rps or 0.0)
            rates = [r.offered_rps for r in points]
            style = {"marker": "o", "linestyle": "-"} if mode == "des" else {"marker": "x", "linestyle": "none", "markersize": 9}
            label = f"{policy} ({mode})"
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
