"""The ``rayfleet bench`` command family.

Each sub-benchmark is one module with ``add_parser(sub)`` (which registers its command
and sets ``bench_run``) and ``run(args) -> int``; adding one is adding its module name
to ``BENCHMARKS``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from bench.errors import BenchUsageError

BENCHMARKS: tuple[str, ...] = (
    "bench.serve_bench",
    "bench.client_ceiling",
    "bench.overhead",
    "bench.routing",
    "bench.kvindex",
    "bench.ratelimit",
    "bench.autoscale",
)


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks: load, routing, cache, rate limits, autoscaling")
    sub = parser.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for module_name in BENCHMARKS:
        importlib.import_module(module_name).add_parser(sub)


def run_bench(args: argparse.Namespace) -> int:
    """Run the chosen benchmark; a usage mistake is one line on stderr and exit code 2."""
    try:
        return args.bench_run(args)
    except BenchUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
