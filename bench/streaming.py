"""Benchmark 2: an SSE response of 200 chunks, through the processor versus direct.

The pod is bench.sse_server (raw asyncio on uvloop, chunks pre-encoded, its own
process), in two flavours:

- back to back: the 200 chunks written in one go. Envoy reads many per read, so the
  processor sees far fewer than 200 body frames (the table says how many): the best
  case;
- paced: one chunk per millisecond (an engine's tokens, sped up), so each chunk reaches
  Envoy, and the processor, as its own frame: the case that costs the processor most.

Measured per flavour: time to first event and whole-stream chunk rate at concurrency 1
(routes alternating stream by stream), and aggregate chunks per second at saturation
(wrk, several connections, rounds alternating between routes), with the processor's CPU
per chunk.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench import payloads
from bench.common import (
    RunMode,
    Section,
    Target,
    bounded,
    cpu_seconds,
    fmt,
    median,
    met_mark,
    percentile,
    run_wrk,
    table,
    wrk_script,
)
from bench.httpclient import KeepAliveClient, encode_request
from bench.stack import BenchStack, route_headers, start_stack

NAME = "streaming"
TITLE = "2. Streaming: 200 SSE chunks, direct vs through the processor"
PATH = "/v1/chat/completions"
CHUNKS = 200
PACE_MS = 1.0

# model -> (label, gap between chunks in ms, wrk connection counts). Paced streams last
# >= 200 ms each, so many connections are needed to load the processor: 64 offer more
# chunks than the through route can carry on this machine.
FLAVOURS: dict[str, tuple[str, float, tuple[int, ...]]] = {
    payloads.STREAM_MODEL: ("back to back", 0.0, (4,)),
    payloads.PACED_STREAM_MODEL: (f"paced {PACE_MS:g} ms", PACE_MS, (16, 64)),
}


def _requests(stack: BenchStack, model: str, work: Path) -> dict[str, tuple[bytes, Path]]:
    body = payloads.chat_request(model, stream=True)
    out = {}
    for name, direct in (("direct", True), ("through", False)):
        headers = route_headers(direct, stack.stream_addresses[model])
        script = work / f"wrk-{model}-{name}.lua"
        script.write_text(wrk_script(body, headers), encoding="utf-8")
        out[name] = (encode_request(PATH, body, headers), script)
    return out


def single_stream(
    stack: BenchStack, requests: dict[str, tuple[bytes, Path]], count: int, max_s: float
) -> dict[str, Any]:
    timings: dict[str, list[Any]] = {"direct": [], "through": []}
    clients = {name: KeepAliveClient(stack.front_port, req) for name, (req, _) in requests.items()}
    try:
        for client in clients.values():
            client.stream()  # warm the connections
        for i in bounded(count, max_s):
            for name in ("direct", "through") if i % 2 == 0 else ("through", "direct"):
                timing = clients[name].stream()
                if timing.status != 200 or timing.events != CHUNKS + 1:
                    raise RuntimeError(f"{name}: status {timing.status}, {timing.events} events")
                timings[name].append(timing)
    finally:
        for client in clients.values():
            client.close()
    out: dict[str, Any] = {"streams_per_route": len(timings["direct"])}
    for name, values in timings.items():
        firsts = [t.first_event_s * 1e3 for t in values]
        out[name] = {
            "first_event_p50_ms": percentile(firsts, 50),
            "first_event_p99_ms": percentile(firsts, 99),
            "stream_p50_ms": median([t.total_s * 1e3 for t in values]),
            "chunks_per_s": median([CHUNKS / t.total_s for t in values]),
        }
    out["chunk_rate_ratio"] = out["through"]["chunks_per_s"] / out["direct"]["chunks_per_s"]
    return out


def saturated(
    stack: BenchStack,
    model: str,
    requests: dict[str, tuple[bytes, Path]],
    connections: int,
    mode: RunMode,
) -> dict[str, Any]:
    rounds = mode.pick(2, 1)
    seconds = mode.pick(6.0, 2.0)
    url = f"http://127.0.0.1:{stack.front_port}{PATH}"
    runs: dict[str, list[dict[str, float]]] = {"direct": [], "through": []}
    for r in range(rounds):
        for name in ("direct", "through") if r % 2 == 0 else ("through", "direct"):
            counters0 = stack.ext_proc_counters()
            cpu0 = cpu_seconds(stack.processor.pid)
            upstream0 = cpu_seconds(stack.stream_pids[model])
            started = time.monotonic()
            result = run_wrk(url, requests[name][1], connections=connections, seconds=seconds)
            wall = time.monotonic() - started
            cpu1 = cpu_seconds(stack.processor.pid)
            upstream_share = (cpu_seconds(stack.stream_pids[model]) - upstream0) / wall
            counters1 = stack.ext_proc_counters()
            if result.errors:
                raise RuntimeError(f"{name}: wrk saw {result.errors} errors")
            # One stream per ext_proc filter a request passes: count requests.
            streams = (
                counters1["streams_started"] - counters0["streams_started"]
            ) // stack.ext_proc_filters()
            messages = counters1["stream_msgs_sent"] - counters0["stream_msgs_sent"]
            runs[name].append(
                {
                    "chunks_per_s": result.rps * CHUNKS,
                    "stream_p50_ms": result.p50_ms,
                    "requests": result.requests,
                    "cpu_s": cpu1 - cpu0,
                    "upstream_core_share": upstream_share,
                    "wall_s": wall,
                    "messages_per_stream": messages / streams if streams else 0.0,
                }
            )
    idle_rate = sum(r["cpu_s"] for r in runs["direct"]) / sum(r["wall_s"] for r in runs["direct"])
    through = runs["through"]
    chunks = sum(r["requests"] for r in through) * CHUNKS
    busy = sum(r["cpu_s"] for r in through) - idle_rate * sum(r["wall_s"] for r in through)
    out: dict[str, Any] = {
        "connections": connections,
        "rounds": rounds,
        "seconds": seconds,
        "direct_chunks_per_s": median([r["chunks_per_s"] for r in runs["direct"]]),
        "through_chunks_per_s": median([r["chunks_per_s"] for r in through]),
        "direct_stream_p50_ms": median([r["stream_p50_ms"] for r in runs["direct"]]),
        "through_stream_p50_ms": median([r["stream_p50_ms"] for r in through]),
        "messages_per_stream": median([r["messages_per_stream"] for r in through]),
        "upstream_core_share_direct": max(r["upstream_core_share"] for r in runs["direct"]),
        "processor_cpu_us_per_chunk": busy / chunks * 1e6 if chunks else float("nan"),
    }
    out["ratio"] = out["through_chunks_per_s"] / out["direct_chunks_per_s"]
    return out


def run(mode: RunMode) -> Section:
    work = mode.work_dir / NAME
    sse_pods = {model: (CHUNKS, gap) for model, (_, gap, _) in FLAVOURS.items()}
    stack = start_stack(work, sse_pods=sse_pods)
    results: dict[str, Any] = {}
    try:
        for model, (label, gap, connection_counts) in FLAVOURS.items():
            requests = _requests(stack, model, work)
            count = mode.pick(300, 30) if gap == 0 else mode.pick(20, 4)
            results[model] = {
                "label": label,
                "gap_ms": gap,
                "c1": single_stream(stack, requests, count, mode.pick(60.0, 10.0)),
                "saturation": [
                    saturated(stack, model, requests, connections, mode)
                    for connections in connection_counts
                ],
            }
    finally:
        stack.stop()

    c1_rows = []
    sat_rows = []
    for r in results.values():
        c1, sat = r["c1"], r["saturation"]
        for route in ("direct", "through"):
            c1_rows.append(
                [
                    r["label"],
                    route,
                    fmt(c1[route]["first_event_p50_ms"], 3),
                    fmt(c1[route]["first_event_p99_ms"], 3),
                    fmt(c1[route]["stream_p50_ms"], 2),
                    fmt(c1[route]["chunks_per_s"], 0),
                ]
            )
        added_p50 = c1["through"]["first_event_p50_ms"] - c1["direct"]["first_event_p50_ms"]
        added_p99 = c1["through"]["first_event_p99_ms"] - c1["direct"]["first_event_p99_ms"]
        c1_rows.append(
            [
                r["label"],
                "**through - direct**",
                f"**{fmt(added_p50, 3)}**",
                f"**{fmt(added_p99, 3)}**",
                "",
                f"**{c1['chunk_rate_ratio'] * 100:.1f}%** of direct",
            ]
        )
        for run in sat:
            sat_rows.append(
                [
                    r["label"],
                    str(run["connections"]),
                    fmt(run["direct_chunks_per_s"], 0),
                    fmt(run["through_chunks_per_s"], 0),
                    f"**{run['ratio'] * 100:.1f}%**",
                    f"{fmt(run['direct_stream_p50_ms'], 1)} / "
                    f"{fmt(run['through_stream_p50_ms'], 1)}",
                    fmt(run["messages_per_stream"], 1),
                    fmt(run["processor_cpu_us_per_chunk"], 1),
                    f"{run['upstream_core_share_direct'] * 100:.0f}%",
                ]
            )
    fast = results[payloads.STREAM_MODEL]
    paced = results[payloads.PACED_STREAM_MODEL]
    n_fast = fast["c1"]["streams_per_route"]
    n_paced = paced["c1"]["streams_per_route"]
    pod_peak = max(
        run["upstream_core_share_direct"] for r in results.values() for run in r["saturation"]
    )
    section = Section(NAME, TITLE, data=results)
    section.body = "\n\n".join(
        [
            "Upstream: bench.sse_server (raw asyncio + uvloop, its own process, chunks "
            f"pre-encoded). Each response is {CHUNKS} chat-completion chunks plus "
            "`data: [DONE]`. Back to back the pod writes the whole response at once and "
            "Envoy forwards it in a few reads, so the processor sees few body frames; "
            "paced, each chunk is its own write and mostly its own frame (the message "
            "counts below show it). The SSE pod used at most "
            f"{pod_peak * 100:.0f}% of a core in any direct run (last column), so the "
            "direct rate is set by Envoy, wrk or the pacing (timer granularity makes a "
            "1 ms gap 1-2 ms), not by the pod.",
            f"Concurrency 1 ({n_fast} back-to-back and {n_paced} paced streams per route, "
            "routes alternating): time from sending the request to the first `data:` "
            "bytes, whole-stream time, and chunks per second of one stream "
            f"({CHUNKS} / whole-stream time; back to back this is mostly the first-event "
            "delay).",
            table(
                [
                    "upstream",
                    "route",
                    "first event p50 ms",
                    "first event p99 ms",
                    "stream p50 ms",
                    "chunks/s (one stream)",
                ],
                c1_rows,
            ),
            "Saturation: wrk, 1 thread, median of the rounds; chunks/s = completed "
            f"streams/s x {CHUNKS}. Messages per stream: ext_proc messages Envoy sent the "
            "processor per SSE stream over both ext_proc filters (3 are the request "
            "headers and body for the routing filter and the request headers for the "
            "observer; the rest are response body frames, which the observer sends "
            "without waiting for an answer). Processor CPU per chunk has the background "
            "(scraping) rate taken off.",
            table(
                [
                    "upstream",
                    "connections",
                    "direct chunks/s",
                    "through chunks/s",
                    "through/direct",
                    "stream p50 ms (d / t)",
                    "ext_proc messages per stream",
                    "processor CPU µs/chunk",
                    "SSE pod CPU (direct)",
                ],
                sat_rows,
            ),
        ]
    )
    fast_sat = fast["saturation"][-1]
    paced_sat = paced["saturation"][-1]
    section.targets = [
        Target(
            f"streaming chunk throughput, back to back, {fast_sat['connections']} connections",
            ">= 90% of direct",
            f"{fast_sat['ratio'] * 100:.1f}%",
            fast_sat["ratio"] >= 0.9,
        ),
        Target(
            f"streaming chunk throughput, paced {PACE_MS:g} ms, "
            f"{paced_sat['connections']} connections",
            ">= 90% of direct",
            f"{paced_sat['ratio'] * 100:.1f}%",
            paced_sat["ratio"] >= 0.9,
        ),
        Target(
            f"chunk rate of one stream, paced {PACE_MS:g} ms (concurrency 1)",
            ">= 90% of direct",
            f"{paced['c1']['chunk_rate_ratio'] * 100:.1f}%",
            paced["c1"]["chunk_rate_ratio"] >= 0.9,
        ),
    ]
    section.body += "\n\nTargets: " + "; ".join(
        f"{t.name} {t.goal}: {t.figure}, {met_mark(t.met)}" for t in section.targets
    )
    return section
