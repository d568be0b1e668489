"""``python -m engines.simulator serve MODEL [flags]`` (also installed as ``rayfleet-sim``)."""

from __future__ import annotations

import argparse

import uvloop
from pydantic import ValidationError

from engines.config import add_engine_arguments, config_from_args
from engines.simulator.server import serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayfleet-sim", description="A vLLM engine simulator.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="serve a simulated model with vLLM's OpenAI-compatible API")
    add_engine_arguments(serve_parser, simulator=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    namespace = parser.parse_args(argv)
    try:
        config = config_from_args(namespace)
    except ValidationError as error:
        parser.error(str(error))
    raise SystemExit(uvloop.run(serve(config)))


if __name__ == "__main__":
    main()
