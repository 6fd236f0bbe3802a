"""`gateway-extproc serve`: wires the registry, its source, the router and the gRPC and
admin servers together, and runs them until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import random
import signal
import socket
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from gateway_extproc import telemetry, tls
from gateway_extproc.admin import build_admin_app
from gateway_extproc.apis import RoutedPaths
from gateway_extproc.config import Settings
from gateway_extproc.extproc.service import ExternalProcessor
from gateway_extproc.extproc.session import SessionConfig
from gateway_extproc.flowcontrol.config import FlowConfigError, HeaderTrust, load_flow_config
from gateway_extproc.flowcontrol.controller import FlowController
from gateway_extproc.flowcontrol.limits import RateLimiter, SharedWindows
from gateway_extproc.flowcontrol.saturation import NotSaturated, SaturationDetector
from gateway_extproc.kvevents.index import KVBlockIndex
from gateway_extproc.kvevents.subscriber import KVEventSubscriber
from gateway_extproc.metrics import MetricsScraper, MetricsStore
from gateway_extproc.models.registry import ModelRegistry, ModelState
from gateway_extproc.models.source import DiscoverySource, create_source
from gateway_extproc.redis_placements import SharedPlacements, placement_seed
from gateway_extproc.redis_sessions import SharedSessions
from gateway_extproc.routing.affinity import SessionAffinity
from gateway_extproc.routing.catalog import StrategyCatalog, build_catalog
from gateway_extproc.routing.config import load_routing_config
from gateway_extproc.routing.health import HealthPolicy, PodHealth
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.prefix import Placements
from gateway_extproc.routing.prompt_blocks import PromptPreparer
from gateway_extproc.routing.registry import PREDICTED_LATENCY
from gateway_extproc.routing.router import Router
from gateway_extproc.tokenize.catalog import TokenizerCatalog
from gateway_extproc.tracing import Tracer

log = structlog.get_logger("gateway_extproc.server")

EXTPROC_SERVICE = "envoy.service.ext_proc.v3.ExternalProcessor"
# The endpoint-picker protocol's health services: the process is up / it can route.
# `inference-extension` is what the upstream conformance suite's manifests probe.
LIVENESS_SERVICE = "liveness"
READINESS_SERVICE = "readiness"
READY_SERVICES = ("", EXTPROC_SERVICE, READINESS_SERVICE, "inference-extension")
# How soon gRPC health follows the dictionary's sync (admin /readyz follows it at once).
HEALTH_INTERVAL = 0.2
GRPC_HEADROOM = 1024 * 1024  # headers and framing on top of the largest body


@dataclass
class Gateway:
    """Everything one running processor owns."""

    settings: Settings
    registry: ModelRegistry
    inflight: InFlightCounter
    router: Router
    flow: FlowController
    processor: ExternalProcessor
    source: DiscoverySource
    scraper: MetricsScraper
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    admin: web.AppRunner
    kv_events: KVEventSubscriber
    preparer: PromptPreparer
    tracer: Tracer | None = None
    grpc_port: int = 0
    admin_port: int = 0
    # The endpoint picker's plaintext health port (inferencepool discovery only).
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    shared_sessions: SharedSessions | None = None
    shared_placements: SharedPlacements | None = None
    # Set on SIGTERM: health says NOT_SERVING while streams are still answered.
    draining: bool = False

    def ready(self) -> bool:
        return self.registry.synced and not self.draining


def _track_model_states(registry: ModelRegistry) -> None:
    def on_change(_: str, old: ModelState, new: ModelState) -> None:
        if old is not ModelState.ABSENT:
            telemetry.MODELS_BY_STATE.labels(old.value).dec()
        if new is not ModelState.ABSENT:
            telemetry.MODELS_BY_STATE.labels(new.value).inc()

    registry.on_model_change(on_change)


async def start_gateway(
    settings: Settings, *, share_port: bool = False, admin_path: str = ""
) -> Gateway:
    """Start everything. `share_port` and `admin_path` are for a worker of
    `serve --workers N` (workers.py): the gRPC port is shared with the other workers
    (SO_REUSEPORT), and the admin app listens on a Unix socket for the supervisor.

    When a part fails to start (a port taken, say), the parts already started are
    stopped before the error goes up: the caller reports one line, and nothing left
    running (a client session, a gRPC server) complains at exit."""
    if not share_port:
        # Checked first, before anything starts, and exclusively: a stranger's socket on
        # the port, even one that allows sharing (SO_REUSEPORT), makes this fail.
        check_port_free(settings.listen_host, settings.grpc_port, "gRPC")
    async with contextlib.AsyncExitStack() as started:
        gateway = await _start_parts(settings, started, share_port, admin_path)
        started.pop_all()  # from here on, stop_gateway stops them
        return gateway


async def _start_parts(
    settings: Settings, started: contextlib.AsyncExitStack, share_port: bool, admin_path: str
) -> Gateway:
    # Checked before anything starts: a bad certificate is a start-up error, nothing else.
    key_pair = tls.server_key_pair(settings.cert_path) if settings.serves_tls else None
    routing = load_routing_config(settings.routing_config) if settings.routing_config else None
    default_strategy = (
        settings.default_strategy or (routing and routing.default) or PREDICTED_LATENCY
    )
    registry = ModelRegistry()
    _track_model_states(registry)
    inflight = InFlightCounter()
    registry.on_pod_removed(inflight.forget)
    registry.on_pod_removed(lambda pod: telemetry.forget_pod_series(pod.key))
    pod_health = PodHealth(health_policy(settings), in_flight=inflight.count)
    registry.on_pod_removed(pod_health.forget)
    store = MetricsStore(staleness=settings.metrics_staleness)
    scraper = MetricsScraper(
        registry,
        store,
        interval=settings.metrics_interval,
        timeout=settings.metrics_timeout,
        concurrency=settings.metrics_concurrency,
        on_unreachable=pod_health.scrape_unreachable,
    )
    kv_index = KVBlockIndex()
    kv_events = KVEventSubscriber(registry, kv_index, dead_after=settings.kv_events_dead_after)
    # The models file's `tokenizer:` entries reach the registry; --tokenizers-dir is the rest.
    tokenizers = TokenizerCatalog(registry.tokenizers, root=settings.tokenizers_dir)
    preparer = PromptPreparer(tokenizers, kv_index)
    # Replicas sharing a Redis hash prompt blocks alike, to share prefix placements.
    placements = Placements(placement_seed(settings.redis_url) if settings.redis_url else None)
    catalog = build_catalog(
        store,
        inflight,
        slow_start_window=settings.slow_start_window,
        registry=registry,
        rng=random.Random(settings.routing_seed),
        routing=routing,
        shared={KVBlockIndex: kv_index, Placements: placements},
    )
    saturation = SaturationDetector(
        store,
        inflight,
        queue_threshold=settings.saturation_queue,
        max_inflight=settings.max_inflight_per_pod,
    )
    router = Router(
        registry,
        catalog,
        default_strategy,
        inflight,
        fallback_endpoints=settings.fallback_endpoints,
        retry_after=settings.retry_after_seconds,
        preparer=preparer,
        health=pod_health,
        filters=(NotSaturated(saturation),) if saturation.enabled else (),
    )
    flow = await _flow_controller(settings, registry, saturation)
    started.push_async_callback(flow.limiter.close)
    inflight.on_release(flow.wake)
    store.on_record(flow.wake)
    registry.on_model_change(flow.wake)
    tracer = (
        Tracer(settings.otlp_endpoint, sample_ratio=settings.trace_sample_ratio)
        if settings.otlp_endpoint
        else None
    )
    if tracer is not None:
        started.callback(tracer.shutdown)
    processor = ExternalProcessor(
        router,
        SessionConfig(
            max_body_bytes=settings.max_body_bytes,
            target_pod_header=settings.target_pod_header,
            inject_include_usage=settings.inject_include_usage,
            access_log=settings.access_log,
            conformance_mode=settings.conformance_mode,
            tracer=tracer,
            routed_paths=RoutedPaths(settings.allowed_paths),
        ),
        record_dir=settings.record_dir,
        flow=flow,
    )
    if settings.record_dir:
        Path(settings.record_dir).mkdir(parents=True, exist_ok=True)
    if settings.fallback_endpoints:
        log.warning(
            "fallback_endpoints_need_a_list_aware_data_plane",
            hint="x-gateway-destination-endpoint now lists several pods; an Envoy ORIGINAL_DST "
            f"cluster takes one host: read it from {settings.target_pod_header} instead",
        )
    started.callback(preparer.close)
    kv_events.start()  # before the source fills the registry: every pod gets its stream
    started.push_async_callback(kv_events.stop)
    source = create_source(settings, registry)
    await source.start()
    started.push_async_callback(source.stop)
    await scraper.start()
    started.push_async_callback(scraper.stop)
    shared_sessions = await _share_sessions(settings, catalog)
    if shared_sessions is not None:
        started.push_async_callback(shared_sessions.stop)
    shared_placements = await _share_placements(settings, placements, registry)
    if shared_placements is not None:
        started.push_async_callback(shared_placements.stop)

    max_message = settings.max_body_bytes + GRPC_HEADROOM
    grpc_server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", max_message),
            ("grpc.max_send_message_length", max_message),
            # Only workers of one `serve --workers N` share the port; their supervisor
            # checked that nobody else holds it (workers.py).
            ("grpc.so_reuseport", 1 if share_port else 0),
        ]
    )
    ext_grpc.add_ExternalProcessorServicer_to_server(processor, grpc_server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, grpc_server)
    started.push_async_callback(grpc_server.stop, 0)  # also unstarted: its __del__ needs it
    grpc_port = _add_port(grpc_server, f"{settings.listen_host}:{settings.grpc_port}", key_pair)
    await grpc_server.start()
    health_server, health_port = None, 0
    if settings.discovery == "inferencepool":
        # Kubelet gRPC probes speak plaintext, so health gets a port of its own.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(
            f"{settings.listen_host}:{settings.grpc_health_port}"
        )
        if health_port == 0:
            raise OSError(f"cannot listen on {settings.listen_host}:{settings.grpc_health_port}")
        await health_server.start()
        started.push_async_callback(health_server.stop, 0)
    await health_servicer.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)

    gateway_ref: list[Gateway] = []
    admin_app = build_admin_app(
        registry,
        inflight,
        lambda: gateway_ref[0].ready(),
        kv_events=kv_events.streams,
        health=pod_health,
        draining=lambda: gateway_ref[0].draining,
    )
    admin = web.AppRunner(admin_app, access_log=None)
    await admin.setup()
    started.push_async_callback(admin.cleanup)
    if admin_path:
        await web.UnixSite(admin, admin_path).start()
        admin_port = 0
    else:
        site = web.TCPSite(admin, settings.listen_host, settings.admin_port)
        try:
            await site.start()
        except OSError as exc:
            raise cannot_listen(settings.listen_host, settings.admin_port, "admin", exc) from None
        admin_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    gateway = Gateway(
        settings=settings,
        registry=registry,
        inflight=inflight,
        router=router,
        flow=flow,
        processor=processor,
        source=source,
        scraper=scraper,
        shared_sessions=shared_sessions,
        shared_placements=shared_placements,
        grpc_server=grpc_server,
        health=health_servicer,
        admin=admin,
        kv_events=kv_events,
        preparer=preparer,
        tracer=tracer,
        grpc_port=grpc_port,
        admin_port=admin_port,
        health_server=health_server,
        health_port=health_port,
    )
    gateway_ref.append(gateway)
    await _set_serving(gateway)
    log.info(
        "gateway_started",
        grpc_port=grpc_port,
        admin_port=admin_port,
        health_port=health_port or None,
        tls=settings.serves_tls,
        discovery=settings.discovery,
        default_strategy=default_strategy,
        tracing=settings.otlp_endpoint or "off",
    )
    return gateway


def check_port_free(host: str, port: int, what: str) -> int:
    """Bind `host:port` exclusively (no SO_REUSEPORT) and let it go: OSError naming the
    port when anything holds it, even a socket that allows sharing. The port bound (a
    free one for port 0). `serve --workers N` holds the port this way for its workers."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise cannot_listen(host, port, what, exc) from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            probe.bind(address)
        except OSError as exc:
            raise cannot_listen(host, port, what, exc) from None
        return int(probe.getsockname()[1])


def cannot_listen(host: str, port: int, what: str, exc: OSError) -> OSError:
    """The one-line error for a port that cannot be bound: `cannot listen on
    0.0.0.0:9090 (admin): address already in use`, without errno or repeated address."""
    reason = exc.strerror.split(": ")[-1].lower() if exc.strerror else str(exc)
    return OSError(f"cannot listen on {host}:{port} ({what}): {reason}")


def _add_port(server: grpc.aio.Server, address: str, key_pair: tls.KeyPair | None) -> int:
    """Bind the ext_proc port, with TLS when given a key pair; the bound port."""
    if key_pair is not None:
        pair = (key_pair.private_key_pem, key_pair.certificate_pem)
        bound = server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
        log.info("grpc_tls", certificate="self-signed" if key_pair.self_signed else "cert-path")
    else:
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError:  # grpc's "failed to bind": the port is taken
            bound = 0
    if bound == 0:
        raise OSError(f"cannot listen on {address} (gRPC)")
    return bound


async def _set_serving(gateway: Gateway, previous: bool | None = None) -> bool:
    """Publish readiness on the gRPC health services when it differs from `previous`."""
    ready = gateway.ready()
    if ready is not previous:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if ready
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for service in READY_SERVICES:
            await gateway.health.set(service, status)
    return ready


def health_policy(settings: Settings) -> HealthPolicy:
    return HealthPolicy(
        eject_after=settings.eject_after,
        base_seconds=settings.eject_base_seconds,
        max_seconds=max(settings.eject_max_seconds, settings.eject_base_seconds),
        max_fraction=settings.eject_max_fraction,
    )


async def _flow_controller(
    settings: Settings, registry: ModelRegistry, saturation: SaturationDetector
) -> FlowController:
    flow_config = load_flow_config(settings.flow_config)  # FlowConfigError stops start-up
    shared: SharedWindows | None = None
    if settings.redis_url and not flow_config.has_limits:
        log.info("redis_url_for_sessions_only", hint="no rate limit is configured (--flow-config)")
    elif settings.redis_url:
        from gateway_extproc.flowcontrol.redis_limits import RedisWindows

        try:
            windows = RedisWindows(settings.redis_url)
        except ValueError as exc:
            raise FlowConfigError(f"--redis-url: {exc}") from None
        try:
            await windows.ping()
        except Exception as exc:  # not fatal: counting resumes when Redis answers
            log.warning("redis_unreachable", problem=repr(exc), hint="requests are let through")
        shared = windows
    return FlowController(
        registry,
        saturation,
        RateLimiter(flow_config, shared),
        objectives=flow_config.objectives,
        header_policy={name: HeaderTrust(trust) for name, trust in settings.header_policy},
        queue_timeout=settings.queue_timeout,
        wait_for_pods=settings.wait_for_pods,
        retry_after=settings.retry_after_seconds,
        write_metadata=settings.flow_metadata,
    )


async def _share_sessions(settings: Settings, catalog: StrategyCatalog) -> SharedSessions | None:
    """With --redis-url, session-affinity's sessions are shared by every replica."""
    profile = catalog.resolve("session-affinity")
    affinity = getattr(profile, "sessions", None)
    if not settings.redis_url or not isinstance(affinity, SessionAffinity):
        return None
    shared = SharedSessions(settings.redis_url, affinity.learn)
    affinity.on_pick = shared.placed
    await shared.start()
    return shared


async def _share_placements(
    settings: Settings, placements: Placements, registry: ModelRegistry
) -> SharedPlacements | None:
    """With --redis-url, every replica's prefix indexes learn every replica's placements."""
    if not settings.redis_url or not placements.indexes:
        return None
    shared = SharedPlacements(
        settings.redis_url,
        placements.apply,
        knows_pod=lambda key: registry.pod(key) is not None,
    )
    placements.publish = shared.placed
    await shared.start()
    return shared


async def stop_gateway(gateway: Gateway) -> None:
    """Stop taking new streams, let in-flight ones finish within the grace period."""
    for service in READY_SERVICES:
        await gateway.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    await gateway.grpc_server.stop(gateway.settings.grace_period)
    if gateway.health_server is not None:
        await gateway.health_server.stop(0)
    await gateway.source.stop()
    await gateway.scraper.stop()
    await gateway.kv_events.stop()
    gateway.preparer.close()
    await gateway.flow.limiter.close()
    if gateway.tracer is not None:
        await asyncio.to_thread(gateway.tracer.shutdown)  # exports the last spans
    if gateway.shared_sessions is not None:
        await gateway.shared_sessions.stop()
    if gateway.shared_placements is not None:
        await gateway.shared_placements.stop()
    await gateway.admin.cleanup()


async def drain(gateway: Gateway, hurry: asyncio.Event) -> None:
    """Say NOT_SERVING (gRPC health, /readyz) at once, and keep answering new streams for
    the drain delay: health-checking Envoys stop opening streams here before the server
    refuses them, so no request lands on a closed port. `hurry` cuts the delay short."""
    gateway.draining = True
    await _set_serving(gateway)
    delay = gateway.settings.drain_delay
    log.info("gateway_draining", drain_delay=delay, open_streams=gateway.processor.open_streams)
    if delay > 0 and not hurry.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), timeout=delay)


def stop_signals() -> tuple[asyncio.Event, asyncio.Event]:
    """Events set by this loop's SIGTERM/SIGINT handlers: `stop` on either; `hurry` on
    SIGINT or a second signal, which skip the drain delay (whoever types Ctrl-C is not
    behind a health-checking load balancer)."""
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        if sig is signal.SIGINT or stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop, hurry


async def serve(
    settings: Settings,
    *,
    share_port: bool = False,
    admin_path: str = "",
    parent_pid: int = 0,
) -> None:
    """Run until SIGTERM or SIGINT, then drain and stop. SIGTERM (Kubernetes, systemd,
    docker stop) drains for --drain-delay; SIGINT (Ctrl-C) or a second signal skips the
    delay: whoever types Ctrl-C is not behind a health-checking load balancer. A worker
    (`parent_pid`) also stops when its supervisor is gone."""
    gateway = await start_gateway(settings, share_port=share_port, admin_path=admin_path)
    # What start-up built lives as long as the process: keep it out of the collector's
    # full passes, which otherwise walk it again and again under load (a few us per
    # request measured).
    gc.collect()
    gc.freeze()
    stop, hurry = stop_signals()
    ready = await _set_serving(gateway)
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=HEALTH_INTERVAL)
        if parent_pid and os.getppid() != parent_pid:
            log.warning("supervisor_gone", hint="the serve --workers parent exited; stopping")
            stop.set()
            hurry.set()
        ready = await _set_serving(gateway, ready)
    await drain(gateway, hurry)
    log.info("gateway_stopping", open_streams=gateway.processor.open_streams)
    await stop_gateway(gateway)
    log.info("gateway_stopped")


def run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        _run_loop(main)
    finally:
        telemetry.flush_logs()  # the lines logged on the loop and not yet written


def _run_loop(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional (not on Windows)
        asyncio.run(main)
        return
    uvloop.run(main)


def run(settings: Settings, unknown_environment: list[str] | None = None) -> int:
    telemetry.configure_logging(settings.log_level, settings.log_format)
    if unknown_environment:
        log.warning(
            "unknown_environment_variables",
            names=unknown_environment,
            hint="no flag reads these; see docs/configuration.md",
        )
    try:
        run_loop(serve(settings))
    except (OSError, ValueError) as exc:
        # A port taken, a bad setting, certificate or routing config (RoutingConfigError
        # is a ValueError): one line, no traceback.
        log.error("gateway_failed_to_start", problem=str(exc))
        return 1
    return 0
