"""The `gateway-extproc` command: serve, simulate, replay, demo."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from gateway_extproc import __version__, config


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """`--help` ends each flag's help with its default, as argparse's
    ArgumentDefaultsHelpFormatter does, except where the help already says it ("default:
    ...", for a default worked out at start such as "the routing config's default, else
    predicted-latency"). An empty default (None, "") shows as "none". The default is the value in
    force when the flag is not given, so a GATEWAY_* variable that is set shows as it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        value = action.default
        if (
            not action.option_strings
            or action.required
            or "default:" in text
            or value is argparse.SUPPRESS
        ):
            return text
        if value is None:
            shown = "none"
        elif isinstance(value, bool):
            shown = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            shown = ",".join(str(item) for item in value) or "none"
        else:
            shown = str(value) or "none"
        default = f"(default: {shown.replace('%', '%%')})"
        # Before the "[env GATEWAY_...]" suffix add_flag gives every serve flag.
        head, env, tail = text.partition(" [env ")
        return f"{head} {default}{env}{tail}" if env else f"{text} {default}"


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag or variable is one line on stderr (exit 2), not the whole usage: the
    `serve` usage alone is some fifty lines, which bury the error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway-extproc",
        description="Envoy ext_proc processor that routes LLM inference requests.",
        formatter_class=DefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrors
    )

    serve = commands.add_parser(
        "serve", help="run the ext_proc gRPC server", formatter_class=DefaultsHelpFormatter
    )
    from gateway_extproc.models.source import source_names

    config.add_serve_arguments(serve, source_names())

    from gateway_extproc.devtools.simulator import app as simulator_app

    simulate = commands.add_parser(
        "simulate",
        help="run a simulated vLLM-compatible engine",
        formatter_class=DefaultsHelpFormatter,
    )
    simulator_app.add_arguments(simulate)

    replay = commands.add_parser(
        "replay",
        help="replay conformance recordings against an ext_proc server",
        formatter_class=DefaultsHelpFormatter,
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
        "demo",
        help="start Envoy, the processor and simulated engines locally",
        formatter_class=DefaultsHelpFormatter,
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
        problem = default_strategy_problem(settings)
        if problem:  # as the parser says a bad flag: one line, status 2
            print(f"gateway-extproc serve: error: {problem}", file=sys.stderr)
            return 2
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


def default_strategy_problem(settings: config.Settings) -> str:
    """Why --default-strategy (or GATEWAY_DEFAULT_STRATEGY) names no strategy, checked
    when the command line is read rather than when the router is built (in every worker
    of `serve --workers N`); "" when it names one or is unset."""
    if not settings.default_strategy:
        return ""
    from gateway_extproc.routing.catalog import strategy_problem
    from gateway_extproc.routing.config import load_routing_config
    from gateway_extproc.routing.registry import RoutingConfigError

    routing = None
    if settings.routing_config:
        try:
            routing = load_routing_config(settings.routing_config)
        except RoutingConfigError:
            return ""  # start-up reports the file's own problem, in one line
    problem = strategy_problem(settings.default_strategy, routing)
    flag = f"--default-strategy ({config.env_name('--default-strategy')})"
    return f"{flag}: {problem}" if problem else ""


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
