"""The processes of the overhead, streaming and profile benchmarks, started with
gateway_extproc.devtools.localstack.

    client -> front Envoy :L --(route A: x-bench-direct)-------------------> pod
                              \\-(route B: ext_proc -> processor)-----------> pod

The front Envoy runs the shipped bootstrap (envoy/envoy.yaml) rendered by localstack with
one extra route put in front: requests carrying `x-bench-direct` skip the ext_proc filter
(ExtProcPerRoute disabled) and go to the same ORIGINAL_DST cluster, addressed by the
`x-gateway-destination-endpoint` header the client sets itself. Everything else (filter
settings, cluster, access log, buffer limits) is the shipped file's, so the two routes
differ by the processor alone and the filter settings cannot drift from the product's.

The pod is a second Envoy with `direct_response` routes (a chat completion, and a vLLM
/metrics page for the scraper) or, for streaming, bench.sse_server; each runs in its own
process.
"""

from __future__ import annotations

import socket
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import payloads
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ManagedProcess, ProcessGroup

DIRECT_HEADER = "x-bench-direct"
DESTINATION_HEADER = "x-gateway-destination-endpoint"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"

_HCM = (
    "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
    ".HttpConnectionManager"
)
_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
_PER_ROUTE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute"
_EXT_PROC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor"


def connection_manager(doc: dict[str, Any]) -> dict[str, Any]:
    listener = doc["static_resources"]["listeners"][0]
    manager: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return manager


def front_bootstrap(listen_port: int, admin_port: int, extproc_port: int) -> dict[str, Any]:
    """envoy/envoy.yaml (ports rendered by localstack) plus the direct route."""
    rendered = localstack.render_envoy_config(
        localstack.repo_file(localstack.ENVOY_CONFIG),
        listen_port=listen_port,
        admin_port=admin_port,
        extproc_port=extproc_port,
    )
    doc: dict[str, Any] = yaml.safe_load(rendered)
    manager = connection_manager(doc)
    filters = [f["name"] for f in manager["http_filters"]]
    if EXT_PROC_FILTER not in filters:
        raise ValueError(f"{localstack.ENVOY_CONFIG} has no {EXT_PROC_FILTER} filter")
    # Every ext_proc filter (the routing one and the observer) is off on this route.
    disabled = {
        f["name"]: {"@type": _PER_ROUTE, "disabled": True}
        for f in manager["http_filters"]
        if f["typed_config"].get("@type") == _EXT_PROC_TYPE
    }
    direct_route = {
        "match": {"prefix": "/", "headers": [{"name": DIRECT_HEADER, "present_match": True}]},
        "route": {"cluster": "inference_pods", "timeout": "0s"},
        "typed_per_filter_config": disabled,
    }
    manager["route_config"]["virtual_hosts"][0]["routes"].insert(0, direct_route)
    return doc


def add_processor_endpoints(doc: dict[str, Any], ports: list[int]) -> None:
    """List more processor processes in the processor cluster (Envoy picks one per
    stream, round robin by default)."""
    for cluster in doc["static_resources"]["clusters"]:
        if cluster["name"] == localstack.EXTPROC_CLUSTER:
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            for port in ports:
                address = {"socket_address": {"address": LOCALHOST, "port_value": port}}
                endpoints.append({"endpoint": {"address": address}})


def ext_proc_settings(doc: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter's typed_config in a bootstrap (for the report)."""
    for entry in connection_manager(doc)["http_filters"]:
        if entry["name"] == EXT_PROC_FILTER:
            config: dict[str, Any] = entry["typed_config"]
            return config
    raise KeyError(EXT_PROC_FILTER)


def pod_bootstrap(listen_port: int, admin_port: int) -> dict[str, Any]:
    """An Envoy that answers like a vLLM pod, from memory: the upstream that is never
    the bottleneck."""

    def answer(body: bytes, content_type: str, match: dict[str, str]) -> dict[str, Any]:
        return {
            "match": match,
            "direct_response": {"status": 200, "body": {"inline_string": body.decode()}},
            "response_headers_to_add": [
                {
                    "header": {"key": "content-type", "value": content_type},
                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
                }
            ],
        }

    metrics = payloads.vllm_metrics_text().encode()
    manager = {
        "@type": _HCM,
        "stat_prefix": "pod",
        "codec_type": "AUTO",
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": _ROUTER}}],
        "route_config": {
            "name": "pod",
            # The default cap (4 KiB) is smaller than a vLLM /metrics page.
            "max_direct_response_body_size_bytes": 1 << 20,
            "virtual_hosts": [
                {
                    "name": "pod",
                    "domains": ["*"],
                    "routes": [
                        answer(metrics, "text/plain; version=0.0.4", {"path": "/metrics"}),
                        answer(payloads.chat_completion(), "application/json", {"prefix": "/"}),
                    ],
                }
            ],
        },
    }
    return {
        "admin": {"address": {"socket_address": {"address": LOCALHOST, "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "pod",
                    "address": {
                        "socket_address": {"address": LOCALHOST, "port_value": listen_port}
                    },
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": manager,
                                }
                            ]
                        }
                    ],
                }
            ]
        },
    }


def start_pod_envoy(log_dir: Path, listen_port: int, admin_port: int) -> ManagedProcess:
    config = log_dir / "pod-envoy.yaml"
    log_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(pod_bootstrap(listen_port, admin_port)), encoding="utf-8")
    return localstack.start_envoy_bootstrap(
        config, log_dir, admin_port=admin_port, concurrency=1, name="pod-envoy"
    )


def start_sse_server(log_dir: Path, port: int, chunks: int, gap_ms: float) -> ManagedProcess:
    argv = [sys.executable, "-m", "bench.sse_server", "--port", str(port), "--chunks", str(chunks)]
    argv += ["--gap-ms", str(gap_ms)]
    return localstack.spawn(
        f"sse-server-{port}",
        argv,
        log_dir,
        ready_url=f"http://{LOCALHOST}:{port}/health",
        env=None,
    )


def start_baseline_processor(
    log_dir: Path, port: int, destination: str, extra_args: Sequence[str] = ()
) -> ManagedProcess:
    argv = [sys.executable, "-m", "bench.baseline_processor", "--port", str(port)]
    argv += ["--destination", destination, *extra_args]
    process = localstack.spawn("baseline-processor", argv, log_dir)
    deadline = time.monotonic() + localstack.DEFAULT_START_TIMEOUT
    while not _port_open(port):
        if not process.alive() or time.monotonic() > deadline:
            process.stop()
            raise localstack.StartupError(f"baseline processor did not listen on {port}")
        time.sleep(0.05)
    return process


def _port_open(port: int) -> bool:
    """True when something accepts connections on the port (gRPC has no HTTP probe)."""
    try:
        socket.create_connection((LOCALHOST, port), timeout=0.5).close()
    except OSError:
        return False
    return True


def write_models_file(path: Path, models: dict[str, list[tuple[str, str]]]) -> Path:
    """models: name -> [(pod name, ip:port)]."""
    doc = {
        "models": [
            {"name": name, "pods": [{"name": pod, "address": address} for pod, address in pods]}
            for name, pods in models.items()
        ]
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def envoy_stats(admin_port: int, contains: str) -> dict[str, int]:
    """Counters and gauges of an Envoy whose name contains `contains`."""
    url = f"http://{LOCALHOST}:{admin_port}/stats?filter={contains}"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            out[name.strip()] = int(value)
    return out


@dataclass
class BenchStack:
    """Pod(s), processor and front Envoy, running; stop() ends them newest first."""

    group: ProcessGroup
    front_port: int
    front_admin: int
    processor: ManagedProcess
    processors: list[ManagedProcess]
    front: ManagedProcess
    pod_address: str  # the completion pod (Envoy)
    stream_addresses: dict[str, str] = field(default_factory=dict)  # model -> SSE pod
    stream_pids: dict[str, int] = field(default_factory=dict)  # model -> its process
    bootstrap: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        self.group.stop()

    def ext_proc_counters(self) -> dict[str, int]:
        """The ext_proc counters of the routing filter and the observer (if any) summed:
        what Envoy sent the processor in all."""
        out: dict[str, int] = {}
        for name, value in envoy_stats(self.front_admin, "ext_proc").items():
            key = name.rsplit(".", 1)[-1]
            out[key] = out.get(key, 0) + value
        return out

    def ext_proc_filters(self) -> int:
        """How many ext_proc filters a request through the processor passes (each opens
        its own stream)."""
        manager = connection_manager(self.bootstrap)
        return sum(
            1 for f in manager["http_filters"] if f["typed_config"].get("@type") == _EXT_PROC_TYPE
        )


def start_stack(
    log_dir: Path,
    *,
    processor_args: list[str] | None = None,
    sse_pods: dict[str, tuple[int, float]] | None = None,
    baseline: bool = False,
    processors: int = 1,
    edit_bootstrap: Callable[[dict[str, Any]], object] | None = None,
    front_concurrency: int = 1,
) -> BenchStack:
    """Start the pod Envoy (and one SSE pod per model in `sse_pods`: model -> (chunks,
    gap in ms)), the processor with the production defaults (JSON logs at info, access
    log on) plus `processor_args`, and the front Envoy with one worker.

    With `baseline` the processor is bench.baseline_processor (fixed routing to the
    completion pod; `processor_args` are its own flags); with `processors` > 1 that
    many processor processes run and the front Envoy's processor cluster lists them all
    (one picked per stream, round robin);
    `edit_bootstrap` may change the front bootstrap (what-if experiments);
    `front_concurrency` is the front Envoy's worker threads (each opens its own
    connection to the processor).
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    group = ProcessGroup()
    env = localstack.environment_without_gateway_settings()
    try:
        pod_port, pod_admin = localstack.free_port(), localstack.free_port()
        group.add(start_pod_envoy(log_dir, pod_port, pod_admin))
        pod_address = f"{LOCALHOST}:{pod_port}"
        models = {payloads.BENCH_MODEL: [("pod-0", pod_address)]}
        stream_addresses: dict[str, str] = {}
        stream_pids: dict[str, int] = {}
        for i, (model, (chunks, gap_ms)) in enumerate((sse_pods or {}).items()):
            sse_port = localstack.free_port()
            sse = group.add(start_sse_server(log_dir, sse_port, chunks, gap_ms))
            stream_pids[model] = sse.pid
            stream_addresses[model] = f"{LOCALHOST}:{sse_port}"
            models[model] = [(f"sse-{i}", stream_addresses[model])]
        localstack.wait_ready(group)
        models_file = write_models_file(log_dir / "models.yaml", models)

        grpc_ports = [localstack.free_port() for _ in range(processors)]
        started: list[ManagedProcess] = []
        for i, grpc_port in enumerate(grpc_ports):
            if baseline:
                process = start_baseline_processor(
                    log_dir, grpc_port, pod_address, processor_args or []
                )
            else:
                process = localstack.start_processor(
                    models_file,
                    log_dir,
                    grpc_port=grpc_port,
                    admin_port=localstack.free_port(),
                    # Production defaults (JSON logs at info); start_processor asks for
                    # the console format, which deployments do not use.
                    extra_args=[
                        *("--log-format", "json", "--log-level", "info"),
                        *(processor_args or []),
                    ],
                    env=env,
                    name=f"processor-{i}",
                )
            started.append(group.add(process))
        localstack.wait_ready(started)

        front_port, front_admin = localstack.free_port(), localstack.free_port()
        bootstrap = front_bootstrap(front_port, front_admin, grpc_ports[0])
        add_processor_endpoints(bootstrap, grpc_ports[1:])
        if edit_bootstrap is not None:
            edit_bootstrap(bootstrap)
        front = group.add(start_front_envoy(log_dir, bootstrap, front_admin, front_concurrency))
        localstack.wait_ready([front])
    except BaseException:
        group.stop()
        raise
    return BenchStack(
        group=group,
        front_port=front_port,
        front_admin=front_admin,
        processor=started[0],
        processors=started,
        front=front,
        pod_address=pod_address,
        stream_addresses=stream_addresses,
        stream_pids=stream_pids,
        bootstrap=bootstrap,
    )


def start_front_envoy(
    log_dir: Path, bootstrap: dict[str, Any], admin_port: int, concurrency: int = 1
) -> ManagedProcess:
    """The front Envoy on an already rendered bootstrap, with `concurrency` workers.
    localstack.start_envoy would render the file again and point every processor
    endpoint at one port."""
    config = log_dir / "front-bootstrap.yaml"
    config.write_text(yaml.safe_dump(bootstrap, sort_keys=False), encoding="utf-8")
    return localstack.start_envoy_bootstrap(
        config, log_dir, admin_port=admin_port, concurrency=concurrency, name="front-envoy"
    )


def route_headers(direct: bool, destination: str) -> dict[str, str]:
    """Request headers for one of the two routes."""
    headers = {"content-type": "application/json"}
    if direct:
        headers[DIRECT_HEADER] = "1"
        headers[DESTINATION_HEADER] = destination
    return headers
