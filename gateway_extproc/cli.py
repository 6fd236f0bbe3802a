"""The `gateway-extproc` command: serve, simulate, replay, demo."""

from __future__ import annotations

import argparse
import sys

from gateway_extproc import __version__, config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-extproc",
        description="Envoy ext_proc processor that routes LLM inference requests.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the ext_proc gRPC server")
    from gateway_extproc.models.source import source_names

    config.add_serve_arguments(serve, source_names())

    from gateway_extproc.devtools.simulator import app as simulator_app

    simulate = commands.add_parser("simulate", help="run a simulated vLLM-compatible engine")
    simulator_app.add_arguments(simulate)

    replay = commands.add_parser(
        "replay", help="replay conformance recordings against an ext_proc server"
    )
    replay.add_argument("paths", nargs="+", metavar="FILE_OR_DIR", help="recordings (*.json)")
    replay.add_argument("--target", required=True, help="the ext_proc server, HOST:PORT")
    replay.add_argument(
        "--models-file",
        default=None,
        help="the target's model dictionary, to check that picked pods serve the model",
    )

    from gateway_extproc.devtools import demo

    demo_parser = commands.add_parser(
        "demo", help="start Envoy, the processor and simulated engines locally"
    )
    demo.add_arguments(demo_parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(build_parser().parse_args(argv))
    except KeyboardInterrupt:  # Ctrl-C before a command set up its own handling
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "serve":
        settings = config.settings_from_args(args)
        if settings.workers > 1:
            from gateway_extproc import workers

            return workers.run(settings, config.unknown_environment(args))
        from gateway_extproc import server

        return server.run(settings, config.unknown_environment(args))
    if args.command == "simulate":
        from gateway_extproc.devtools.simulator import app as simulator_app

        return simulator_app.run(args)
    if args.command == "replay":
        return run_replay(args)
    if args.command == "demo":
        from gateway_extproc.devtools import demo

        return demo.run(args)
    return 2


def run_replay(args: argparse.Namespace) -> int:
    import asyncio

    from gateway_extproc.conformance.replay import replay_paths

    results = asyncio.run(replay_paths(args.paths, args.target, args.models_file))
    for result in results:
        print(result.line())
    failed = sum(not r.passed for r in results)
    print(f"{len(results) - failed} passed, {failed} failed")
    return 1 if failed or not results else 0


if __name__ == "__main__":
    sys.exit(main())
