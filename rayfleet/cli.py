"""The ``rayfleet`` command: ``up``, ``down``, ``status``, ``bench`` and ``fleet``.

Errors the user can fix print as one line with the fix and exit 2; nothing prints a
traceback for a mistake in the flags.
"""

from __future__ import annotations

import argparse
import json
import shlex
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
    _add_fleet_parser(commands)
    return parser


def _add_fleet_parser(commands: argparse._SubParsersAction) -> None:
    p_fleet = commands.add_parser("fleet", help="RayClusterFleets on Kubernetes: render manifests, run the controller")
    fleet_commands = p_fleet.add_subparsers(dest="fleet_command", required=True)

    p_render = fleet_commands.add_parser("render", help="print a RayClusterFleet serving a model with vLLM (YAML)")
    p_render.add_argument("--model", required=True, help="model to serve, e.g. meta-llama/Llama-3.1-8B-Instruct")
    p_render.add_argument("--tp", type=int, required=True, help="tensor-parallel size: GPUs per model replica")
    p_render.add_argument("--replicas", type=int, default=1, help="model replicas, one RayCluster each (default 1)")
    p_render.add_argument("--name", default=None, help="fleet name (default: a slug of the model)")
    p_render.add_argument("--namespace", default=None, help="namespace (default: none, kubectl's current one)")
    p_render.add_argument("--image", default=None, help="vLLM image with Ray (default: a pinned vllm/vllm-openai)")
    p_render.add_argument("--gpus-per-node", type=int, default=None,
                          help="GPUs per Ray node; below --tp, each replica spans tp/gpus-per-node nodes (default: --tp)")  # fmt: skip
    p_render.add_argument("--max-surge", default="1", help="extra clusters during a rollout: count or %% (default 1)")
    p_render.add_argument("--max-unavailable", default="0",
                          help="clusters a rollout may take down: count or %% (default 0)")  # fmt: skip

    p_controller = fleet_commands.add_parser("controller", help="run the RayClusterFleet controller (leader-elected)")
    p_controller.add_argument("--namespace", default=None, help="watch one namespace (default: all namespaces)")
    p_controller.add_argument("--lease-namespace", default="rayfleet-system", help="namespace of the leader lease")
    p_controller.add_argument("--lease-name", default="rayfleet-fleet-controller", help="name of the leader lease")
    p_controller.add_argument("--identity", default=None, help="leader-election identity (default: $POD_NAME or hostname)")
    p_controller.add_argument("--kubeconfig", default=None,
                              help="kubeconfig file (default: the in-cluster service account)")  # fmt: skip
    p_controller.add_argument("--broken-grace-seconds", type=float, default=30.0,
                              help="how long a provisioned cluster may stay not ready before it is replaced (default 30)")  # fmt: skip


def _run_fleet(args: argparse.Namespace, argv: list[str]) -> int:
    if args.fleet_command == "render":
        from fleet.render import DEFAULT_IMAGE, render_fleet, to_yaml

        manifest = render_fleet(
            model=args.model, tp=args.tp, replicas=args.replicas, name=args.name, namespace=args.namespace,
            image=args.image or DEFAULT_IMAGE, gpus_per_node=args.gpus_per_node,
            max_surge=args.max_surge, max_unavailable=args.max_unavailable,
        )  # fmt: skip
        # The command line heads the output: a committed manifest says how to regenerate it.
        print(f"# {shlex.join(['rayfleet', *argv])}\n{to_yaml(manifest)}", end="")
        return 0
    # Imported here: the controller needs the Kubernetes client, rendering does not.
    from fleet.ray_cluster_fleet import run_controller

    return run_controller(
        namespace=args.namespace, lease_namespace=args.lease_namespace, lease_name=args.lease_name,
        identity=args.identity, kubeconfig=args.kubeconfig, broken_grace_s=args.broken_grace_seconds,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from fleet.render import RenderError

    argv = sys.argv[1:] if argv is None else argv
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
        if args.command == "fleet":
            return _run_fleet(args, argv)
    except (UsageError, RenderError) as exc:
        print(f"rayfleet: error: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
