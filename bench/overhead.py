"""Benchmark 1: what the processor adds to a request.

One front Envoy (envoy/envoy.yaml, one worker), one pod (an Envoy answering a chat
completion from memory, one worker), two routes that differ only by the ext_proc filter
(see bench.stack). Measured in one run, routes interleaved so that the machine's noise
falls on both alike:

- concurrency 1: latency p50/p99 of each route over one keep-alive connection each,
  requests alternating between the routes; added latency = through - direct;
- saturation: wrk, one thread, a few connections, rounds alternating direct/through:
  requests per second and the ratio through/direct;
- the processor's CPU time per request (utime + stime from /proc, all threads), with the
  background cost measured during the direct runs (metrics scraping) taken off.

Variants, each with its own stack and its own direct baseline, all running at once with
the measurements taken round-robin over them (so they share the machine's good and bad
moments): the product with its production defaults (JSON access log at info), the
product with `--no-access-log` (what the log line costs), bench/baseline_processor.py, a
plain grpc.aio processor with fixed routing (the floor grpc.aio itself sets; the
difference to it is the product's own work), two what-if experiments for the change
list (response phases not sent; two processor processes), the product with tracing
on (`--otlp-endpoint`, every request a span, exported to a receiver process on loopback;
the defaults row is tracing off), and the floor again ending its routing stream right
after the routing answer as the product does (what that feature costs grpc.aio).
bench/session_cost.py adds what tracing costs in the session alone.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import payloads, session_cost
from bench.common import (
    RunMode,
    Section,
    Target,
    bounded,
    cpu_times,
    fmt,
    median,
    met_mark,
    percentile,
    run_wrk,
    table,
    wrk_script,
)
from bench.httpclient import KeepAliveClient, encode_request
from bench.stack import BenchStack, connection_manager, route_headers, start_stack
from gateway_extproc.devtools import localstack

NAME = "overhead"
TITLE = "1. Overhead: the same Envoy, direct vs through the processor"
PATH = "/v1/chat/completions"
CONNECTIONS = 4


@dataclass(frozen=True)
class Variant:
    """One processor set-up to measure against the direct route."""

    label: str
    args: tuple[str, ...] = ()
    baseline: bool = False  # bench/baseline_processor.py instead of the product
    processors: int = 1
    edit: Callable[[dict[str, Any]], object] | None = None  # changes the front bootstrap
    what_if: bool = False  # an experiment for the change list, not the shipped set-up
    tracing: bool = False  # --otlp-endpoint: spans to the section's OTLP receiver


def _observer_lingers(doc: dict[str, Any]) -> None:
    """The observer's deferred_close_timeout at 1 s instead of the shipped 0.1 s."""
    for entry in connection_manager(doc)["http_filters"]:
        if entry["typed_config"].get("observability_mode"):
            entry["typed_config"]["deferred_close_timeout"] = "1s"


def _no_response_path(doc: dict[str, Any]) -> None:
    """The routing filter alone, as shipped (it sends no response phase): the observer
    filter removed."""
    filters = connection_manager(doc)["http_filters"]
    filters[:] = [f for f in filters if not f["typed_config"].get("observability_mode")]


VARIANTS = (
    Variant("gateway-extproc, defaults (access log on)"),
    Variant("gateway-extproc --no-access-log", ("--no-access-log",)),
    Variant("plain grpc.aio floor (bench/baseline_processor.py)", baseline=True),
    Variant(
        "gateway-extproc, one filter: the response on the routing stream (Envoy Gateway's shape)",
        edit=localstack.single_filter_shape,
    ),
    Variant(
        "what-if: response phases not sent (no accounting)",
        edit=_no_response_path,
        what_if=True,
    ),
    Variant(
        "what-if: observer streams kept open 1 s after the response",
        edit=_observer_lingers,
        what_if=True,
    ),
    Variant("gateway-extproc --otlp-endpoint (tracing on, every request a span)", tracing=True),
    Variant(
        "plain grpc.aio floor, routing stream ended after its answer (as the product ends it)",
        ("--end-after-routing",),
        baseline=True,
    ),
)
TRACING_LABEL = VARIANTS[-2].label
EARLY_END_FLOOR_LABEL = VARIANTS[-1].label
# Issue 14's goal for the processor's CPU per request against the plain grpc.aio floor.
FLOOR_RATIO_GOAL = 1.1


@dataclass
class Route:
    name: str
    direct: bool
    request: bytes
    script: Path


def routes(stack: BenchStack, work: Path, body: bytes, destination: str) -> list[Route]:
    out = []
    for name, direct in (("direct", True), ("through", False)):
        headers = route_headers(direct, destination)
        script = work / f"wrk-{name}.lua"
        script.write_text(wrk_script(body, headers), encoding="utf-8")
        out.append(Route(name, direct, encode_request(PATH, body, headers), script))
    return out


def check_routes(stack: BenchStack, direct: Route, through: Route) -> float:
    """One request per route: both 200, and only `through` opened an ext_proc stream.
    Returns ext_proc messages Envoy sent per processed request (over 20 requests)."""
    before = stack.ext_proc_counters()
    with KeepAliveClient(stack.front_port, direct.request) as client:
        status, _ = client.request()
    if status != 200 or stack.ext_proc_counters()["streams_started"] != before["streams_started"]:
        raise RuntimeError(f"direct route broken: status {status} or it reached the processor")
    with KeepAliveClient(stack.front_port, through.request) as client:
        for _ in range(20):
            status, _ = client.request()
            if status != 200:
                raise RuntimeError(f"through route answered {status}")
    after = stack.ext_proc_counters()
    streams = after["streams_started"] - before["streams_started"]
    if streams != 20 * stack.ext_proc_filters():
        raise RuntimeError(f"expected 20 ext_proc streams per filter, Envoy opened {streams}")
    return (after["stream_msgs_sent"] - before["stream_msgs_sent"]) / 20


@dataclass
class Setup:
    """One variant's running stack, its two routes and what it measured so far."""

    variant: Variant
    stack: BenchStack
    direct: Route
    through: Route
    messages: float
    c1: dict[str, list[float]] = field(default_factory=lambda: {"direct": [], "through": []})
    runs: dict[str, list[dict[str, float]]] = field(
        default_factory=lambda: {"direct": [], "through": []}
    )


def start_setup(variant: Variant, mode: RunMode, index: int, otlp_endpoint: str) -> Setup:
    work = mode.work_dir / f"overhead-{index}"
    tracing = ["--otlp-endpoint", otlp_endpoint] if variant.tracing else []
    stack = start_stack(
        work,
        processor_args=[*variant.args, *tracing],
        baseline=variant.baseline,
        processors=variant.processors,
        edit_bootstrap=variant.edit,
    )
    try:
        direct, through = routes(stack, work, payloads.chat_request(), stack.pod_address)
        messages = check_routes(stack, direct, through)
    except BaseException:
        stack.stop()
        raise
    return Setup(variant, stack, direct, through, messages)


def latency_block(setup: Setup, pairs: int, max_s: float) -> None:
    """`pairs` requests per route, alternating, on fresh keep-alive connections."""
    port = setup.stack.front_port
    with (
        KeepAliveClient(port, setup.direct.request) as d,
        KeepAliveClient(port, setup.through.request) as t,
    ):
        for _ in range(20):  # connection set-up and warm-up
            d.request()
            t.request()
        clients = {"direct": d, "through": t}
        for i in bounded(pairs, max_s):
            # Alternate which route goes first so neither always follows the other.
            for name in ("direct", "through") if i % 2 == 0 else ("through", "direct"):
                started = time.perf_counter()
                status, _ = clients[name].request()
                setup.c1[name].append(time.perf_counter() - started)
                if status != 200:
                    raise RuntimeError(f"{name}: status {status}")


def _cpu(pids: list[int]) -> tuple[float, float]:
    times = [cpu_times(pid) for pid in pids]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def wrk_run(setup: Setup, route: Route, seconds: float) -> None:
    stack = setup.stack
    processors = [p.pid for p in stack.processors]
    url = f"http://127.0.0.1:{stack.front_port}{PATH}"
    proc0, front0 = _cpu(processors), cpu_times(stack.front.pid)
    started = time.monotonic()
    result = run_wrk(url, route.script, connections=CONNECTIONS, seconds=seconds)
    wall = time.monotonic() - started
    proc1, front1 = _cpu(processors), cpu_times(stack.front.pid)
    if result.errors:
        raise RuntimeError(f"{route.name}: wrk saw {result.errors} errors")
    setup.runs[route.name].append(
        {
            "rps": result.rps,
            "requests": result.requests,
            "wall_s": wall,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
            "proc_user_s": proc1[0] - proc0[0],
            "proc_sys_s": proc1[1] - proc0[1],
            "front_cpu_s": sum(front1) - sum(front0),
        }
    )


def summarise_c1(setup: Setup) -> dict[str, Any]:
    out: dict[str, Any] = {"requests_per_route": len(setup.c1["direct"])}
    for name, values in setup.c1.items():
        out[name] = {"p50_ms": percentile(values, 50) * 1e3, "p99_ms": percentile(values, 99) * 1e3}
    out["added_p50_ms"] = out["through"]["p50_ms"] - out["direct"]["p50_ms"]
    out["added_p99_ms"] = out["through"]["p99_ms"] - out["direct"]["p99_ms"]
    return out


def summarise_saturation(setup: Setup, rounds: int, seconds: float) -> dict[str, Any]:
    runs = setup.runs
    # The processor's own background work (scraping the pod 5x/s) while it routes
    # nothing: measured in the direct runs, taken off the through runs.
    idle_rate = sum(r["proc_user_s"] + r["proc_sys_s"] for r in runs["direct"]) / sum(
        r["wall_s"] for r in runs["direct"]
    )
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "connections": CONNECTIONS}
    for name, values in runs.items():
        requests = sum(v["requests"] for v in values)
        out[name] = {
            "rps": median([v["rps"] for v in values]),
            "rps_all": [round(v["rps"]) for v in values],
            "p50_ms": median([v["p50_ms"] for v in values]),
            "p99_ms": median([v["p99_ms"] for v in values]),
            "front_cpu_us_per_req": sum(v["front_cpu_s"] for v in values) / requests * 1e6,
        }
    t = runs["through"]
    requests = sum(v["requests"] for v in t)
    background = idle_rate * sum(v["wall_s"] for v in t)
    user = sum(v["proc_user_s"] for v in t)
    system = sum(v["proc_sys_s"] for v in t)
    out["processor_cpu_us_per_req"] = (user + system - background) / requests * 1e6
    out["processor_user_share"] = user / (user + system) if user + system else float("nan")
    out["processor_background_cpu_ms_per_s"] = idle_rate * 1e3
    out["processor_core_share"] = (user + system) / sum(v["wall_s"] for v in t)
    out["ratio"] = out["through"]["rps"] / out["direct"]["rps"]
    return out


def start_otlp_receiver(mode: RunMode) -> tuple[localstack.ManagedProcess, str]:
    """The OTLP/gRPC receiver the tracing variant exports to, as a process of its own
    (a collector beside the processor); ready once its port takes connections."""
    port = localstack.free_port()
    argv = [sys.executable, "-m", "gateway_extproc.devtools.otlp_receiver", "--port", str(port)]
    process = localstack.spawn("otlp-receiver", argv, mode.work_dir / "overhead-otlp")
    for _ in bounded(200, 10.0):
        try:
            socket.create_connection((localstack.LOCALHOST, port), timeout=0.5).close()
            return process, f"http://{localstack.LOCALHOST}:{port}"
        except OSError:
            if not process.alive():
                break
            time.sleep(0.05)
    process.stop()
    raise RuntimeError(f"the OTLP receiver did not start: {process.log_tail()}")


def measure_all(mode: RunMode) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Every variant's stack runs at once (idle ones cost next to nothing) and the
    measurements go round-robin over them, so that they share the machine's good and
    bad moments and their figures can be compared with each other. Then, with the stacks
    gone, the session's own cost with tracing off and on."""
    setups: list[Setup] = []
    receiver, otlp_endpoint = start_otlp_receiver(mode)
    try:
        for index, variant in enumerate(VARIANTS):
            setups.append(start_setup(variant, mode, index, otlp_endpoint))
        blocks = mode.pick(4, 2)
        pairs = mode.pick(2000, 300) // blocks
        for _ in range(blocks):
            for setup in setups:
                latency_block(setup, pairs, mode.pick(20.0, 5.0))
        rounds = mode.pick(3, 1)
        seconds = mode.pick(5.0, 2.0)
        for r in range(rounds):
            for setup in setups:
                order = (setup.direct, setup.through)
                for route in order if r % 2 == 0 else order[::-1]:
                    wrk_run(setup, route, seconds)
        results = [
            {
                "variant": setup.variant.label,
                "what_if": setup.variant.what_if,
                "processor_args": list(setup.variant.args)
                + (["--otlp-endpoint", "(receiver)"] if setup.variant.tracing else []),
                "ext_proc_messages_per_request": setup.messages,
                "c1": summarise_c1(setup),
                "saturation": summarise_saturation(setup, rounds, seconds),
            }
            for setup in setups
        ]
        for setup in setups:
            setup.stack.stop()
        setups = []
        session = session_cost.measure(otlp_endpoint, mode.pick(20_000, 3_000))
        return results, session
    finally:
        for setup in setups:
            setup.stack.stop()
        receiver.stop()


def run(mode: RunMode) -> Section:
    results, session = measure_all(mode)
    section = Section(NAME, TITLE, data={"variants": results, "session_cost": session})
    c1_rows = []
    sat_rows = []
    for r in results:
        c1, sat = r["c1"], r["saturation"]
        c1_rows.append(
            [
                r["variant"],
                fmt(c1["direct"]["p50_ms"], 3),
                fmt(c1["through"]["p50_ms"], 3),
                f"**{fmt(c1['added_p50_ms'], 3)}**",
                fmt(c1["direct"]["p99_ms"], 3),
                fmt(c1["through"]["p99_ms"], 3),
                f"**{fmt(c1['added_p99_ms'], 3)}**",
            ]
        )
        sat_rows.append(
            [
                r["variant"],
                fmt(sat["direct"]["rps"], 0),
                fmt(sat["through"]["rps"], 0),
                f"**{sat['ratio'] * 100:.1f}%**",
                f"{fmt(sat['direct']['p50_ms'])} / {fmt(sat['through']['p50_ms'])}",
                f"{fmt(sat['direct']['p99_ms'])} / {fmt(sat['through']['p99_ms'])}",
                fmt(sat["processor_cpu_us_per_req"], 0),
                f"{sat['processor_core_share'] * 100:.0f}%",
                f"{sat['processor_user_share'] * 100:.0f}%",
                f"{fmt(sat['direct']['front_cpu_us_per_req'], 0)} / "
                f"{fmt(sat['through']['front_cpu_us_per_req'], 0)}",
            ]
        )
    main = results[0]
    quiet, floor, one_filter = results[1], results[2], results[3]
    product_cpu = main["saturation"]["processor_cpu_us_per_req"]
    floor_cpu = floor["saturation"]["processor_cpu_us_per_req"]
    log_cpu = product_cpu - quiet["saturation"]["processor_cpu_us_per_req"]
    c1, sat = main["c1"], main["saturation"]
    n = c1["requests_per_route"]
    front_direct = sat["direct"]["front_cpu_us_per_req"]
    front_through = sat["through"]["front_cpu_us_per_req"]
    envoy_cap = 1e6 / front_through / sat["direct"]["rps"]
    section.body = "\n\n".join(
        [
            f"All variants' stacks run side by side; measurements go round-robin over them. "
            f"Concurrency 1: {n} requests per route and variant, in blocks taken in turn "
            "across the variants, each block over one keep-alive connection per route with "
            "the two routes alternating request by request. Latency in ms, measured by the "
            "client (a blocking raw-socket client, the same on both routes).",
            table(
                [
                    "processor",
                    "direct p50",
                    "through p50",
                    "added p50",
                    "direct p99",
                    "through p99",
                    "added p99",
                ],
                c1_rows,
            ),
            f"Saturation: wrk, 1 thread, {sat['connections']} connections, "
            f"{sat['rounds']} round(s) over all variants of {sat['seconds']:.0f} s per "
            "route, direct and through alternating; median of the rounds. Processor "
            "CPU is utime+stime of all its threads per request, minus its background "
            "rate measured during the direct runs "
            f"({fmt(sat['processor_background_cpu_ms_per_s'], 1)} ms CPU/s: metrics "
            "scraping). Front Envoy CPU per request is for direct / through.",
            table(
                [
                    "processor",
                    "direct req/s",
                    "through req/s",
                    "through/direct",
                    "p50 ms (d / t)",
                    "p99 ms (d / t)",
                    "processor CPU µs/req",
                    "processor % of a core",
                    "of it user",
                    "front Envoy CPU µs/req (d / t)",
                ],
                sat_rows,
            ),
            f"Per request the product costs {fmt(product_cpu - floor_cpu, 0)} µs of CPU "
            f"more than the plain grpc.aio floor ({fmt(product_cpu, 0)} vs "
            f"{fmt(floor_cpu, 0)} µs); with the access log off it measured "
            f"{fmt(product_cpu - log_cpu, 0)} µs. The floor itself adds "
            f"{fmt(floor['c1']['added_p50_ms'], 2)} ms at p50 and carries "
            f"{floor['saturation']['ratio'] * 100:.0f}% of direct throughput.",
            "The shipped envoy/envoy.yaml runs two ext_proc filters: the routing filter "
            "(request headers and body, answered) and an observer in observability mode "
            "that sends the response to the processor without holding it. The one-filter "
            "row is the shape Envoy Gateway's EnvoyExtensionPolicy produces (no "
            "observability mode there): the response headers and every body frame wait "
            "for the processor's answer on the routing stream. "
            "Rows marked what-if are experiments behind the change list, not a shipped "
            "set-up: the observer filter removed (the processor then sees no response and "
            "accounts nothing: the cost of the request path alone), and the observer's "
            "streams held open 1 s after each response (`deferred_close_timeout`, "
            "shipped at 0.1 s) to show what lingering streams do to the saturated p99.",
            f"Envoy sends the processor {main['ext_proc_messages_per_request']:.1f} "
            "ext_proc messages per request in the shipped set-up, on two streams: request "
            "headers and body on the routing stream (two round trips waited for), and on "
            "the observer stream the request headers, the response body as a data frame "
            "and an empty end-of-stream frame (none waited for). In the one-filter shape "
            f"it is {one_filter['ext_proc_messages_per_request']:.1f}, every one answered "
            "and waited for. "
            f"The front Envoy alone spends {fmt(front_through, 0)} µs of CPU per request "
            f"through the processor against {fmt(front_direct, 0)} µs direct; on its one "
            f"worker that caps the through route at about {fmt(1e6 / front_through, 0)} "
            f"req/s ({envoy_cap * 100:.0f}% of direct) even with a processor that costs "
            "nothing. Per-round req/s (direct / through): "
            + "; ".join(
                f"{r['variant']}: {r['saturation']['direct']['rps_all']} / "
                f"{r['saturation']['through']['rps_all']}"
                for r in results
            )
            + ".",
        ]
    )
    early = next(r for r in results if r["variant"] == EARLY_END_FLOOR_LABEL)
    early_cpu = early["saturation"]["processor_cpu_us_per_req"]
    quiet_cpu = quiet["saturation"]["processor_cpu_us_per_req"]
    section.body += "\n\n" + (
        "Against the floor, same run: the defaults row costs "
        f"{product_cpu / floor_cpu:.2f}x the plain grpc.aio floor's CPU per request "
        f"({quiet_cpu / floor_cpu:.2f}x with the access log off). The product ends its "
        "routing stream right after the routing answer (so that a processor restart cuts "
        "no response); the floor doing the same costs "
        f"{fmt(early_cpu, 0)} µs ({early_cpu / floor_cpu:.2f}x the plain floor), and "
        f"against that floor the defaults row is {product_cpu / early_cpu:.2f}x "
        f"({quiet_cpu / early_cpu:.2f}x with the access log off). The rest is the "
        "product's own Python per request (session, routing, accounting, metrics, "
        "access log): see the profile section."
    )
    traced = next(r for r in results if r["variant"] == TRACING_LABEL)
    traced_cpu = traced["saturation"]["processor_cpu_us_per_req"]
    section.body += "\n\n" + (
        "Tracing. Off (the default, every other row) the request path holds three "
        f"`tracer is not None` tests, {fmt(session['check_ns'], 0)} ns each, and the "
        "OpenTelemetry SDK is not imported. On, with every request sampled and exported "
        f"to a receiver process: {fmt(traced_cpu, 0)} µs of processor CPU per request "
        f"against {fmt(product_cpu, 0)} µs for the defaults row "
        f"({fmt(traced_cpu - product_cpu, 0)} µs more), "
        f"{traced['saturation']['ratio'] * 100:.1f}% of direct throughput against "
        f"{sat['ratio'] * 100:.1f}%, and {fmt(traced['c1']['added_p50_ms'], 3)} ms added "
        f"at p50 against {fmt(c1['added_p50_ms'], 3)} ms. The session alone "
        f"(bench/session_cost.py, {session['requests']:,.0f} requests driven in-process, "
        "access log off, CPU of every thread so the exporter's is counted): "
        f"{fmt(session['off_us'], 1)} µs per request off, {fmt(session['on_us'], 1)} µs on."
    )
    section.targets = [
        Target(
            "added latency p50, concurrency 1",
            "<= 0.3 ms",
            f"{c1['added_p50_ms']:.3f} ms",
            c1["added_p50_ms"] <= 0.3,
        ),
        Target(
            "added latency p99, concurrency 1",
            "<= 1 ms",
            f"{c1['added_p99_ms']:.3f} ms",
            c1["added_p99_ms"] <= 1.0,
        ),
        Target(
            "saturated throughput through the processor",
            ">= 60% of direct",
            f"{sat['ratio'] * 100:.1f}% ({sat['through']['rps']:.0f} / "
            f"{sat['direct']['rps']:.0f} req/s)",
            sat["ratio"] >= 0.6,
        ),
        Target(
            "processor CPU per request vs the plain grpc.aio floor, same run",
            f"<= {FLOOR_RATIO_GOAL}x",
            f"{product_cpu / floor_cpu:.2f}x ({product_cpu:.0f} / {floor_cpu:.0f} µs)",
            product_cpu / floor_cpu <= FLOOR_RATIO_GOAL,
        ),
    ]
    section.body += (
        "\n\n"
        + "Targets: "
        + "; ".join(f"{t.name} {t.goal}: {t.figure}, {met_mark(t.met)}" for t in section.targets)
    )
    return section
