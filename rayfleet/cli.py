"""The ``rayfleet`` command: ``up``, ``down``, ``status`` and ``bench``.

Errors the user can fix print as one line with the fix and exit 2; nothing prints a
traceback for a mistake in the flags.
"""

from __future__ import annotations

import argparse
import json
import sys

from rayfleet.stack import UpOptions, UsageError, down, format_status, status, up


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfleet", description="Ray-native LLM serving on vLLM.")
    commands = parser.add_subparsers(dest="command", required=True)

    defaults = UpOptions()
    p_up = commands.add_parser("up", help="start Ray, engines and the gateway in the foreground")
    p_up.add_argument("--engines", type=int, default=defaults.engines, help="number of engines (default %(default)s)")
    p_up.add_argument("--model", default=defaults.model, help="model name clients send (default %(default)s)")
    p_up.add_argument("--gpu", default=defaults.gpu, help="simulated GPU: a100, h100, h200, l40s, instant")
    p_up.add_argument("--port", type=int, default=defaults.port, help="gateway port (default %(default)s)")
    p_up.add_argument("--host", default=defaults.host, help="gateway host (default %(default)s)")
    p_up.add_argument("--address", default=None, help="join this Ray cluster instead of starting one (e.g. auto)")
    p_up.add_argument("--engine", choices=["sim", "vllm"], default=defaults.engine, help="simulator or real vLLM")
    p_up.add_argument("--time-scale", type=float, default=defaults.time_scale, help="simulator wall s per engine s")
    p_up.add_argument("--strategy", default=defaults.strategy, help="default routing strategy (default %(default)s)")
    p_up.add_argument("--prefix-index", choices=["approximate", "events"], default=defaults.prefix_index,
                      help="prefix strategies learn from routing history or from the engines' KV events")  # fmt: skip
    p_up.add_argument("--redis", default=None, metavar="URL",
                      help="keep users and limits in Redis (redis://HOST:PORT/DB); default: an embedded store")
    p_up.add_argument("--admin-token", default=None, help="bearer token for the user API (default: generated, printed)")
    p_up.add_argument("--require-api-keys", action="store_true", help="trust API keys only, not a bare 'user' header")
    p_up.add_argument("--anonymous", choices=["allow", "reject"], default=defaults.anonymous,
                      help="requests without a user or key: served without limits (allow) or 401 (reject)")
    p_up.add_argument("--autoscale", choices=["kpa", "hpa", "apa"], default=None,
                      help="scale the engines with Knative's KPA, Kubernetes' HPA or AIBrix's APA")
    p_up.add_argument("--min", dest="min_replicas", type=int, default=defaults.min_replicas, help="fewest engines")
    p_up.add_argument("--max", dest="max_replicas", type=int, default=defaults.max_replicas, help="most engines")
    p_up.add_argument("--autoscale-target", type=float, default=defaults.autoscale_target,
                      help="requests in flight per engine the autoscaler aims at (default %(default)s)")
    p_up.add_argument("--autoscale-option", dest="autoscale_options", action="append", default=[], metavar="KNOB=VALUE",
                      help="a policy knob, e.g. stable-window=60s, panic-window=6s, scale-down-delay=5m (repeatable)")
    p_up.add_argument("--config", dest="config_file", default=None, help="application config YAML (Serve args)")

    commands.add_parser("down", help="stop what `rayfleet up` started")

    p_status = commands.add_parser("status", help="models, endpoints and the gateway address")
    p_status.add_argument("--json", action="store_true", help="print JSON")

    from bench.cli import add_bench_parser

    add_bench_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            if args.engines < 1:
                raise UsageError("--engines must be at least 1")
            options = UpOptions(**{k: v for k, v in vars(args).items() if k in UpOptions.__dataclass_fields__})
            return up(options)
        if args.command == "down":
            return down()
        if args.command == "status":
            info = status()
            print(json.dumps(info, indent=2) if args.json else format_status(info))
            return 0
        if args.command == "bench":
            from bench.cli import run_bench

            return run_bench(args)
    except UsageError as exc:
        print(f"rayfleet: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
