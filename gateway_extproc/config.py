"""Settings: one frozen dataclass built from command-line flags and GATEWAY_* variables.

Each `serve` flag `--some-flag` also reads `GATEWAY_SOME_FLAG`; the flag wins. A value
from the environment is parsed by the same type function as the flag, so a bad value is
a clear start-up error, never a surprise later.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

ENV_PREFIX = "GATEWAY_"


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "0.0.0.0"
    grpc_port: int = 9002
    admin_port: int = 9090
    discovery: str = "static"
    models_file: str = ""
    models_reload_interval: float = 1.0
    default_strategy: str = "random"
    log_level: str = "info"
    log_format: str = "json"
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_seconds: int = 5
    fallback_endpoints: int = 0
    target_pod_header: str = "target-pod"
    grace_period: float = 10.0
    inject_include_usage: bool = False
    record_dir: str = ""


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()


def add_flag(
    parser: argparse.ArgumentParser,
    flag: str,
    *,
    type: Callable[[str], Any] = str,
    default: Any = None,
    help: str = "",
    choices: list[str] | None = None,
) -> None:
    """Add `flag` whose default comes from its GATEWAY_* variable when that is set."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        try:
            default = type(raw)
        except (TypeError, ValueError) as exc:
            parser.error(f"{env}={raw!r} is not valid for {flag}: {exc}")
        if choices is not None and default not in choices:
            parser.error(f"{env}={raw!r} is not one of {', '.join(choices)}")
    parser.add_argument(
        flag, type=type, default=default, choices=choices, help=f"{help} [env {env}]"
    )


def boolean(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("must be true or false")


def add_switch(parser: argparse.ArgumentParser, flag: str, *, default: bool, help: str) -> None:
    """A boolean `--flag` / `--no-flag` whose default comes from its GATEWAY_* variable."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        try:
            default = boolean(raw)
        except ValueError as exc:
            parser.error(f"{env}={raw!r} is not valid for {flag}: {exc}")
    parser.add_argument(
        flag, action=argparse.BooleanOptionalAction, default=default, help=f"{help} [env {env}]"
    )


def positive_int(raw: str) -> int:
    value = int(raw)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value


def non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def port(raw: str) -> int:
    value = int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    d = Settings()
    add_flag(parser, "--listen-host", default=d.listen_host, help="address to listen on")
    add_flag(parser, "--grpc-port", type=port, default=d.grpc_port, help="ext_proc gRPC port")
    add_flag(parser, "--admin-port", type=port, default=d.admin_port, help="admin HTTP port")
    add_flag(
        parser,
        "--discovery",
        default=d.discovery,
        choices=["static"],
        help="where the model dictionary comes from",
    )
    add_flag(parser, "--models-file", default=d.models_file, help="YAML model file (static)")
    add_flag(
        parser,
        "--models-reload-interval",
        type=positive_float,
        default=d.models_reload_interval,
        help="seconds between checks of the models file",
    )
    add_flag(parser, "--default-strategy", default=d.default_strategy, help="routing strategy")
    add_flag(
        parser,
        "--log-level",
        default=d.log_level,
        choices=["debug", "info", "warning", "error"],
        help="log level",
    )
    add_flag(
        parser,
        "--log-format",
        default=d.log_format,
        choices=["json", "console"],
        help="log format",
    )
    add_flag(
        parser,
        "--max-body-bytes",
        type=positive_int,
        default=d.max_body_bytes,
        help="largest request body accepted (keep equal to Envoy's buffer limit)",
    )
    add_flag(
        parser,
        "--retry-after-seconds",
        type=positive_int,
        default=d.retry_after_seconds,
        help="Retry-After sent with 503 answers",
    )
    add_flag(
        parser,
        "--fallback-endpoints",
        type=non_negative_int,
        default=d.fallback_endpoints,
        help="extra pods listed after the pick in the destination header",
    )
    add_flag(
        parser,
        "--target-pod-header",
        default=d.target_pod_header,
        help="second request header carrying the pick (AIBrix convention)",
    )
    add_flag(
        parser,
        "--grace-period",
        type=positive_float,
        default=d.grace_period,
        help="seconds in-flight streams get to finish on shutdown",
    )

    add_switch(
        parser,
        "--inject-include-usage",
        default=d.inject_include_usage,
        help="ask engines for the usage chunk of streamed responses so tokens are counted",
    )
    add_flag(
        parser,
        "--record-dir",
        default=d.record_dir,
        help="write every stream handled as a conformance recording into this folder",
    )


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    return Settings(**{k: v for k, v in vars(args).items() if k in names})
