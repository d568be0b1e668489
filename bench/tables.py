"""Human-readable views of results: a markdown table of rows and vLLM's result block.

JSON keeps seconds; people read milliseconds, so every latency column here says "(ms)".
"""

from __future__ import annotations

from collections.abc import Iterable

from pydantic import BaseModel

from bench.stats import MS_PER_S, Distribution, Metrics

# (row key, header, scale): latencies shown in ms, rates as they are.
_COLUMNS: tuple[tuple[str, str, float], ...] = (
    ("policy", "policy", 1.0),
    ("workload", "workload", 1.0),
    ("concurrency", "conc", 1.0),
    ("offered_rps", "offered req/s", 1.0),
    ("achieved_rps", "achieved req/s", 1.0),
    ("goodput_rps", "goodput req/s", 1.0),
    ("ttft_p50_s", "TTFT p50 (ms)", MS_PER_S),
    ("ttft_p90_s", "TTFT p90 (ms)", MS_PER_S),
    ("ttft_p99_s", "TTFT p99 (ms)", MS_PER_S),
    ("tpot_p50_s", "TPOT p50 (ms)", MS_PER_S),
    ("tpot_p99_s", "TPOT p99 (ms)", MS_PER_S),
    ("itl_p99_s", "ITL p99 (ms)", MS_PER_S),
    ("e2e_p50_s", "E2E p50 (ms)", MS_PER_S),
    ("e2e_p99_s", "E2E p99 (ms)", MS_PER_S),
    ("output_tok_s", "output tok/s", 1.0),
    ("completed", "completed", 1.0),
    ("errors", "errors", 1.0),
)
_HIDDEN = frozenset({"ttft_mean_s", "e2e_mean_s", "duration_s"})


def _cell(value: object, scale: float) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int) and scale == 1.0:
        return str(value)
    scaled = value * scale
    if abs(scaled) >= 100:
        return f"{scaled:.1f}"
    return f"{scaled:.2f}" if abs(scaled) >= 1 else f"{scaled:.3g}"


def format_table(rows: Iterable[BaseModel]) -> str:
    """Markdown table of any benchmark's rows (``BenchRow`` columns first, in their order);
    columns empty in every row are dropped, other fields are appended as-is."""
    dumped = [row.model_dump() for row in rows]
    columns = [c for c in _COLUMNS if any(d.get(c[0]) is not None for d in dumped)]
    known = {c[0] for c in _COLUMNS} | _HIDDEN
    for d in dumped:
        for key in d:
            if key not in known and all(key != c[0] for c in columns):
                columns.append((key, key, 1.0))
    lines = [
        "| " + " | ".join(header for _, header, _ in columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(_cell(d.get(key), scale) for key, _, scale in columns) + " |" for d in dumped]
    return "\n".join(lines)


def _distribution_lines(title: str, name: str, dist: Distribution) -> list[str]:
    lines = [f"{title:-^50}"]
    for label, value in (("Mean", dist.mean), ("Median", dist.p50), ("P90", dist.p90), ("P99", dist.p99)):
        shown = "-" if value is None else f"{value * MS_PER_S:.2f}"
        lines.append(f"{f'{label} {name} (ms):':<40}{shown:<10}")
    return lines


def format_summary(title: str, metrics: Metrics) -> str:
    """The block ``vllm bench serve`` prints, so results can be compared line by line."""

    def line(label: str, value: object) -> str:
        return f"{label + ':':<40}{value!s:<10}"

    lines = [f"{' ' + title + ' ':=^50}", line("Successful requests", metrics.completed)]
    lines.append(line("Failed requests", metrics.errors))
    lines.append(line("Benchmark duration (s)", f"{metrics.duration_s:.2f}"))
    lines.append(line("Total input tokens", metrics.input_tokens))
    lines.append(line("Total generated tokens", metrics.output_tokens))
    lines.append(line("Request throughput (req/s)", f"{metrics.per_s(metrics.completed):.2f}"))
    if metrics.good is not None:
        lines.append(line("Request goodput (req/s)", f"{metrics.per_s(metrics.good):.2f}"))
    lines.append(line("Output token throughput (tok/s)", f"{metrics.per_s(metrics.output_tokens):.2f}"))
    total = metrics.input_tokens + metrics.output_tokens
    lines.append(line("Total token throughput (tok/s)", f"{metrics.per_s(total):.2f}"))
    lines += _distribution_lines("Time to First Token", "TTFT", metrics.ttft)
    lines += _distribution_lines("Time per Output Token (excl. 1st token)", "TPOT", metrics.tpot)
    lines += _distribution_lines("Inter-token Latency", "ITL", metrics.itl)
    lines += _distribution_lines("End-to-end Latency", "E2EL", metrics.e2e)
    lines.append("=" * 50)
    return "\n".join(lines)
