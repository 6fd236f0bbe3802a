"""Settings: one frozen dataclass built from command-line flags and GATEWAY_* variables.

Each `serve` flag `--some-flag` also reads `GATEWAY_SOME_FLAG`; the flag wins. A value
from the environment is parsed by the same type function as the flag, so a bad value is
a clear start-up error, never a surprise later.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Any
from urllib.parse import urlsplit

ENV_PREFIX = "GATEWAY_"
# The inference API paths routed to a pod (apis.INFERENCE_PATHS, which a unit test holds
# this equal to; this bottom-layer module cannot import apis/).
DEFAULT_ALLOWED_PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
)


@dataclass(frozen=True, slots=True)
class Settings:
    listen_host: str = "127.0.0.1"  # the flag's default: default_listen_host()
    grpc_port: int = 9002
    admin_port: int = 9090
    discovery: str = "static"
    models_file: str = ""
    models_reload_interval: float = 1.0
    default_strategy: str = ""  # empty: the routing config's default, else predicted-latency
    routing_config: str = ""
    log_level: str = "info"
    log_format: str = "json"
    max_body_bytes: int = 8 * 1024 * 1024
    retry_after_seconds: int = 5
    fallback_endpoints: int = 0
    target_pod_header: str = "target-pod"
    grace_period: float = 10.0
    drain_delay: float = 5.0
    workers: int = 1
    redis_url: str = ""
    inject_include_usage: bool = False
    access_log: bool = True
    record_dir: str = ""
    allowed_paths: tuple[str, ...] = DEFAULT_ALLOWED_PATHS  # the rest: 404 unsupported_route
    # tracing (tracing.py): off unless an OTLP/gRPC collector is named
    otlp_endpoint: str = ""
    trace_sample_ratio: float = 1.0
    # engine metrics and metric-driven routing
    metrics_interval: float = 0.2
    metrics_timeout: float = 1.0
    metrics_staleness: float = 2.0
    metrics_concurrency: int = 64
    slow_start_window: float = 30.0
    routing_seed: int | None = None
    # precise prefix routing: the models' tokenizers and the engines' KV-cache events
    tokenizers_dir: str = ""
    kv_events_port: int = 5557
    kv_events_dead_after: float = 10.0
    # passive health (routing/health.py)
    eject_after: int = 5
    eject_base_seconds: float = 5.0
    eject_max_seconds: float = 60.0
    eject_max_fraction: float = 0.5
    # Kubernetes discovery
    kubeconfig: str = ""
    kube_context: str = ""
    namespace: tuple[str, ...] = ()
    model_label: str = "model.aibrix.ai/name"
    port_label: str = "model.aibrix.ai/port"
    metric_port_label: str = "model.aibrix.ai/metric-port"
    default_model_port: int = 8000
    kube_resync_period: float = 300.0
    adapter_discovery_interval: float = 0.0
    # InferencePool discovery and the endpoint picker's serving contract
    pool_name: str = ""
    pool_namespace: str = ""  # empty: the namespace this process runs in
    secure_serving: bool | None = None  # None: TLS exactly with inferencepool discovery
    cert_path: str = ""  # directory with tls.crt and tls.key; empty: self-signed
    grpc_health_port: int = 9003  # gRPC health on its own port (inferencepool discovery)
    conformance_mode: bool = False

    # flow control (docs/configuration.md, "Flow control")
    saturation_queue: int = 5
    max_inflight_per_pod: int = 512
    queue_timeout: float = 30.0
    wait_for_pods: float = 3.0
    flow_config: str = ""
    header_policy: tuple[tuple[str, str], ...] = ()
    flow_metadata: bool = False

    @property
    def serves_tls(self) -> bool:
        """Is the ext_proc port TLS? By default only for InferencePool discovery, where
        the gateways calling the picker connect with TLS."""
        if self.secure_serving is None:
            return self.discovery == "inferencepool"
        return self.secure_serving


def default_discovery() -> str:
    """Kubernetes inside a cluster (the service host variable is set), else the file."""
    return "kubernetes" if os.environ.get("KUBERNETES_SERVICE_HOST") else "static"


def default_listen_host() -> str:
    """Every address inside a Kubernetes pod (Envoy and the kubelet's probes come from
    other addresses; the chart's NetworkPolicy says who may connect), else loopback: the
    ext_proc port has no authentication, and a peer reaching it could observe, and
    account for, other clients' requests."""
    return "0.0.0.0" if os.environ.get("KUBERNETES_SERVICE_HOST") else "127.0.0.1"


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


def non_negative_float(raw: str) -> float:
    value = float(raw)
    if not value >= 0:
        raise ValueError("must not be negative")
    return value


def positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise ValueError("must be a positive number")
    return value


def fraction(raw: str) -> float:
    value = float(raw)
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be between 0 and 1")
    return value


# Who may set which request header (--header-policy): the names the flag takes, the
# headers they stand for, and the policies (flowcontrol/config.py's HeaderTrust).
PRIORITY = "priority"
OBJECTIVE = "objective"
FAIRNESS_ID = "fairness-id"
ROUTING_STRATEGY = "routing-strategy"
CONTROLLED_HEADERS = {
    PRIORITY: "x-gateway-priority",
    OBJECTIVE: "x-gateway-inference-objective",
    FAIRNESS_ID: "x-gateway-inference-fairness-id",
    ROUTING_STRATEGY: "routing-strategy",
}
HEADER_POLICIES = ("trusted", "ignored", "rejected")


def header_policy(raw: str) -> tuple[tuple[str, str], ...]:
    """Parse `priority=ignored,routing-strategy=rejected` into (header, policy) pairs."""
    pairs: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, policy = item.partition("=")
        name, policy = name.strip().lower(), policy.strip().lower()
        if not sep or name not in CONTROLLED_HEADERS:
            raise ValueError(
                f"{item!r} is not NAME=POLICY with NAME one of {', '.join(CONTROLLED_HEADERS)}"
            )
        if policy not in HEADER_POLICIES:
            raise ValueError(f"{item!r}: the policy must be one of {', '.join(HEADER_POLICIES)}")
        pairs[CONTROLLED_HEADERS[name]] = policy
    return tuple(pairs.items())


def otlp_endpoint(raw: str) -> str:
    """`http://host:port` (plaintext), `https://host:port` or `host:port` (plaintext):
    where an OTLP/gRPC collector listens. ValueError for anything else."""
    value = raw.strip()
    if not value:
        return ""
    parts = urlsplit(value if "://" in value else f"http://{value}")
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
        raise ValueError("must be http://host:port, https://host:port or host:port")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise ValueError("must name a host and a port (OTLP/gRPC listens on 4317 by default)")
    return value


def path_list(raw: str) -> tuple[str, ...]:
    """`/v1/chat/completions,/v1/audio/*`: exact paths, or prefixes ending in `*`."""
    paths = tuple(dict.fromkeys(p.strip() for p in raw.split(",") if p.strip()))
    if not paths:
        raise ValueError("must name at least one path")
    for path in paths:
        if not path.startswith("/") or "*" in path[:-1] or "?" in path:
            raise ValueError(
                f"{path!r} is not a path (starting with /, no query, `*` only at the end)"
            )
    return paths


def worker_count(raw: str) -> int:
    """A positive number of worker processes, or `auto`: the CPUs this process may run on."""
    if raw.strip().lower() == "auto":
        if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset and cgroup cpusets
            return len(os.sched_getaffinity(0))
        return os.cpu_count() or 1
    return positive_int(raw)


def add_serve_arguments(parser: argparse.ArgumentParser, discovery_sources: Sequence[str]) -> None:
    """The `serve` flags; `discovery_sources` are the names `--discovery` accepts (the
    caller passes models/source.py's, which this bottom-layer module cannot import)."""
    d = Settings()
    add_flag(
        parser,
        "--listen-host",
        default=default_listen_host(),
        help="address the gRPC and admin ports listen on "
        "(default: 0.0.0.0 inside Kubernetes, else 127.0.0.1)",
    )
    add_flag(parser, "--grpc-port", type=port, default=d.grpc_port, help="ext_proc gRPC port")
    add_flag(parser, "--admin-port", type=port, default=d.admin_port, help="admin HTTP port")
    add_flag(
        parser,
        "--discovery",
        default=default_discovery(),
        choices=list(discovery_sources),
        help="where the model dictionary comes from "
        "(default: kubernetes inside a cluster, else static)",
    )
    add_flag(parser, "--models-file", default=d.models_file, help="YAML model file (static)")
    add_flag(
        parser,
        "--models-reload-interval",
        type=positive_float,
        default=d.models_reload_interval,
        help="seconds between checks of the models file",
    )
    add_flag(
        parser,
        "--default-strategy",
        default=d.default_strategy,
        help="routing strategy (profile) of requests without a routing-strategy header "
        "(default: the routing config's default, else predicted-latency)",
    )
    add_flag(
        parser,
        "--routing-config",
        default=d.routing_config,
        help="YAML file declaring more routing profiles and the default one",
    )
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
    add_flag(
        parser,
        "--drain-delay",
        type=non_negative_float,
        default=d.drain_delay,
        help="seconds between SIGTERM (health turns NOT_SERVING) and refusing new streams, "
        "so health-checking Envoys stop sending them first",
    )
    add_flag(
        parser,
        "--workers",
        type=worker_count,
        default=d.workers,
        help="processes serving the gRPC port; 'auto': one per CPU this process may use",
    )

    add_switch(
        parser,
        "--inject-include-usage",
        default=d.inject_include_usage,
        help="ask engines for the usage chunk of streamed responses so tokens are counted",
    )
    add_switch(
        parser,
        "--access-log",
        default=d.access_log,
        help="log one line per finished request at info level",
    )
    add_flag(
        parser,
        "--record-dir",
        default=d.record_dir,
        help="write every stream handled as a conformance recording into this folder",
    )
    add_flag(
        parser,
        "--allowed-paths",
        type=path_list,
        default=d.allowed_paths,
        help="comma-separated request paths routed to a pod (a trailing * matches a prefix); "
        "any other path is answered 404 unsupported_route "
        f"(default: {','.join(d.allowed_paths)})",
    )
    add_flag(
        parser,
        "--otlp-endpoint",
        type=otlp_endpoint,
        default=d.otlp_endpoint,
        help="OTLP/gRPC collector (http://host:4317) to send a span per request to; "
        "default: no tracing",
    )
    add_flag(
        parser,
        "--trace-sample-ratio",
        type=fraction,
        default=d.trace_sample_ratio,
        help="share of new traces sampled (a client's traceparent decides for its own)",
    )
    add_flag(
        parser,
        "--metrics-interval",
        type=positive_float,
        default=d.metrics_interval,
        help="seconds between scrapes of each pod's /metrics",
    )
    add_flag(
        parser,
        "--metrics-timeout",
        type=positive_float,
        default=d.metrics_timeout,
        help="seconds one scrape may take",
    )
    add_flag(
        parser,
        "--metrics-staleness",
        type=positive_float,
        default=d.metrics_staleness,
        help="seconds after which a pod's metrics count as missing",
    )
    add_flag(
        parser,
        "--metrics-concurrency",
        type=positive_int,
        default=d.metrics_concurrency,
        help="scrapes in flight at once",
    )
    add_flag(
        parser,
        "--slow-start-window",
        type=non_negative_float,
        default=d.slow_start_window,
        help="seconds over which a new pod without metrics ramps up to a full share",
    )
    add_flag(
        parser,
        "--routing-seed",
        type=int,
        default=d.routing_seed,
        help="seed the strategies' random choices (reproducible benchmarks); default: unseeded",
    )
    add_flag(
        parser,
        "--tokenizers-dir",
        default=d.tokenizers_dir,
        help="Hugging Face tokenizer directories as DIR/<model name>/ (precise prefix routing)",
    )
    add_flag(
        parser,
        "--kv-events-port",
        type=port,
        default=d.kv_events_port,
        help="Kubernetes: port on each pod's IP where its engine publishes KV-cache events "
        "(used with --tokenizers-dir; 0: none)",
    )
    add_flag(
        parser,
        "--kv-events-dead-after",
        type=positive_float,
        default=d.kv_events_dead_after,
        help="seconds a pod's event socket may stay unconnected before it counts as dead",
    )
    add_health_arguments(parser, d)
    add_kubernetes_arguments(parser, d)
    add_picker_arguments(parser, d)
    add_flow_arguments(parser, d)


def add_go_bool(parser: argparse.ArgumentParser, flag: str, *, default: Any, help: str) -> None:
    """A boolean flag spelled as Go programs take it: `--flag`, `--flag=false`, `--flag
    true`; its GATEWAY_* variable sets the default."""
    env = env_name(flag)
    raw = os.environ.get(env)
    if raw is not None:
        try:
            default = boolean(raw)
        except ValueError as exc:
            parser.error(f"{env}={raw!r} is not valid for {flag}: {exc}")
    parser.add_argument(
        flag, nargs="?", const=True, type=boolean, default=default, help=f"{help} [env {env}]"
    )


def add_picker_arguments(parser: argparse.ArgumentParser, d: Settings) -> None:
    """InferencePool discovery and the serving contract of an endpoint picker, with the
    Gateway API Inference Extension's reference picker's flag names."""
    add_flag(
        parser, "--pool-name", default=d.pool_name, help="InferencePool to serve (inferencepool)"
    )
    add_flag(
        parser,
        "--pool-namespace",
        default=d.pool_namespace,
        help="namespace of the InferencePool (default: the one this pod runs in, else default)",
    )
    add_go_bool(
        parser,
        "--secure-serving",
        default=d.secure_serving,
        help="serve ext_proc over TLS (default: true with --discovery inferencepool, else false)",
    )
    add_flag(
        parser,
        "--cert-path",
        default=d.cert_path,
        help="directory holding tls.crt and tls.key for --secure-serving (default: self-signed)",
    )
    add_flag(
        parser,
        "--grpc-health-port",
        type=port,
        default=d.grpc_health_port,
        help="plaintext gRPC health port (liveness, readiness) with --discovery inferencepool",
    )
    add_go_bool(
        parser,
        "--conformance-mode",
        default=d.conformance_mode,
        help="honour test-epp-endpoint-selection and echo x-conformance-test-served-endpoint "
        "(the upstream conformance suite; never in production)",
    )


def add_health_arguments(parser: argparse.ArgumentParser, d: Settings) -> None:
    add_flag(
        parser,
        "--eject-after",
        type=non_negative_int,
        default=d.eject_after,
        help="consecutive failures (connect errors, timeouts, 5xx, refused or unanswered "
        "metrics scrapes) after which a pod is left out of routing (0: never)",
    )
    add_flag(
        parser,
        "--eject-base-seconds",
        type=positive_float,
        default=d.eject_base_seconds,
        help="how long a first ejection lasts; each further one in a row lasts twice as long",
    )
    add_flag(
        parser,
        "--eject-max-seconds",
        type=positive_float,
        default=d.eject_max_seconds,
        help="the longest an ejection lasts",
    )
    add_flag(
        parser,
        "--eject-max-fraction",
        type=fraction,
        default=d.eject_max_fraction,
        help="largest share of a model's pods left out at once (at least one pod may be)",
    )


def add_flow_arguments(parser: argparse.ArgumentParser, d: Settings) -> None:
    add_flag(
        parser,
        "--saturation-queue",
        type=non_negative_int,
        default=d.saturation_queue,
        help="a pod whose engine reports more waiting requests than this is full (0: off)",
    )
    add_flag(
        parser,
        "--max-inflight-per-pod",
        type=non_negative_int,
        default=d.max_inflight_per_pod,
        help="a pod with this many of our requests in flight is full (0: off)",
    )
    add_flag(
        parser,
        "--queue-timeout",
        type=positive_float,
        default=d.queue_timeout,
        help="seconds a request waits for a pod with room before 429 queue_timeout",
    )
    add_flag(
        parser,
        "--wait-for-pods",
        type=non_negative_float,
        default=d.wait_for_pods,
        help="seconds a request for a model with no ready pod waits for one (0: 503 at once)",
    )
    add_flag(
        parser,
        "--flow-config",
        default=d.flow_config,
        help="YAML file with objectives (name -> priority) and per-tenant rate limits",
    )
    add_flag(
        parser,
        "--redis-url",
        default=d.redis_url,
        help="count rate limits, keep session-affinity sessions and share prefix placements "
        "in this Redis, shared by every replica (default: per process)",
    )
    add_flag(
        parser,
        "--header-policy",
        type=header_policy,
        default=d.header_policy,
        help="who may set which header: NAME=trusted|ignored|rejected, comma-separated, "
        "NAME one of priority, objective, fairness-id, routing-strategy "
        "(default: every header trusted)",
    )
    add_switch(
        parser,
        "--flow-metadata",
        default=d.flow_metadata,
        help="write the fairness id, priority and token counts into dynamic metadata "
        "(namespace gateway_extproc) for Envoy's own rate limiting",
    )


def add_kubernetes_arguments(parser: argparse.ArgumentParser, d: Settings) -> None:
    add_flag(
        parser,
        "--kubeconfig",
        default=d.kubeconfig,
        help="kubeconfig file (default: in-cluster config, else KUBECONFIG)",
    )
    add_flag(parser, "--kube-context", default=d.kube_context, help="kubeconfig context")
    env = env_name("--namespace")
    parser.add_argument(
        "--namespace",
        action="append",
        type=_namespace,
        default=None,
        help=f"namespace to watch, repeatable (default: all) [env {env}, comma-separated]",
    )
    add_flag(
        parser,
        "--model-label",
        default=d.model_label,
        help="pod label naming the model a pod serves",
    )
    add_flag(parser, "--port-label", default=d.port_label, help="pod label with the serving port")
    add_flag(
        parser,
        "--metric-port-label",
        default=d.metric_port_label,
        help="pod label with the metrics port (default: the serving port)",
    )
    add_flag(
        parser,
        "--default-model-port",
        type=port,
        default=d.default_model_port,
        help="serving port when the pod has no port label",
    )
    add_flag(
        parser,
        "--kube-resync-period",
        type=non_negative_float,
        default=d.kube_resync_period,
        help="seconds between full relists (0: never)",
    )
    add_flag(
        parser,
        "--adapter-discovery-interval",
        type=non_negative_float,
        default=d.adapter_discovery_interval,
        help="seconds between polls of pods' /v1/models for LoRA adapters (0: off)",
    )


def _namespace(raw: str) -> str:
    value = raw.strip()
    if not value:
        raise ValueError("must not be empty")
    return value


def namespaces_from(args: argparse.Namespace) -> tuple[str, ...]:
    if args.namespace:
        return tuple(args.namespace)
    raw = os.environ.get(env_name("--namespace"), "")
    return tuple(n.strip() for n in raw.split(",") if n.strip())


def unknown_environment(args: argparse.Namespace) -> list[str]:
    """GATEWAY_* variables that no flag reads: most likely typos, worth a warning."""
    known = {ENV_PREFIX + dest.upper() for dest in vars(args)}
    return sorted(name for name in os.environ if name.startswith(ENV_PREFIX) and name not in known)


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = {f.name for f in fields(Settings)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["namespace"] = namespaces_from(args)
    return Settings(**values)
