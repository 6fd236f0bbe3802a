"""Benchmark 3: the cost of one routing decision and of keeping engine metrics current.

Decision: one `Router.route` call, in process, on the real Router, catalog
(`build_catalog`), registry, metrics store and in-flight counter, for one model served by
N pods. Every pod has fresh metrics (two scrapes recorded, so rates and recent means
exist) and a few requests in flight; the store's clock is frozen so nothing goes stale
while the loop runs. Prompts are 64 chat conversations sharing system prompts, so the
prefix index holds real entries. The timed call includes what the router does per
request (model lookup, strategy, pick-time routability check, in-flight count, decision
histogram); the release afterwards is not timed.

Scrape cost: parsing one vLLM /metrics page (`parse_engine_metrics` plus the store's
`record`), and one scrape round of the real MetricsScraper over N pods, all served by one
static Envoy (bench.stack's pod) over aiohttp keep-alive connections.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import uvloop

from bench import payloads
from bench.common import (
    RunMode,
    Section,
    Target,
    bounded,
    fmt,
    median,
    met_mark,
    percentile,
    table,
)
from bench.stack import start_pod_envoy
from gateway_extproc import localstack, telemetry
from gateway_extproc.metrics.parser import EngineSample, parse_engine_metrics
from gateway_extproc.metrics.scraper import MetricsScraper
from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router
from gateway_extproc.simulator.config import SimulatorConfig
from gateway_extproc.simulator.metrics import EngineMetrics, EngineSnapshot

NAME = "routing"
TITLE = "3. Routing decision cost and scrape cost"
MODEL = "bench-model"
SIZES = (10, 100, 1000, 5000)
WEIGHTED = "prefix-cache:3,least-kv-cache:2,least-request:2"
STRATEGIES = (
    "random",
    "round-robin",
    "least-request",
    "least-kv-cache",
    "least-latency",
    "prefix-cache",
    WEIGHTED,
)
TARGET_PODS = 1000
TARGET_P99_US = 200.0
SCRAPE_SIZES = (10, 100, 1000)
PASSES = 3


class FrozenClock:
    """A clock that stands still, so recorded metrics stay fresh for the whole loop."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def fleet(n: int) -> list[Pod]:
    return [
        Pod(
            name=f"pod-{i}",
            namespace="bench",
            address=f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}:8000",
            models=(MODEL,),
        )
        for i in range(n)
    ]


def samples(rng: random.Random) -> tuple[EngineSample, EngineSample]:
    """Two successive scrapes of one engine: gauges as they are, counters and histogram
    sums grown at this engine's own (random) rates, so every derived value exists."""
    hit, ttft, itl, e2e = (
        rng.uniform(0.1, 0.8),
        rng.uniform(0.02, 0.3),
        rng.uniform(0.01, 0.05),
        rng.uniform(1.0, 6.0),
    )

    def at(requests: float) -> EngineSample:
        return EngineSample(
            running=float(rng.randint(0, 32)),
            waiting=float(rng.randint(0, 4)),
            kv_cache_usage=rng.uniform(0.05, 0.95),
            prefix_cache_queries=requests * 900,
            prefix_cache_hits=requests * 900 * hit,
            prompt_tokens=requests * 900,
            generation_tokens=requests * 120,
            ttft_sum=requests * ttft,
            ttft_count=requests,
            itl_sum=requests * 120 * itl,
            itl_count=requests * 120,
            e2e_sum=requests * e2e,
            e2e_count=requests,
        )

    return at(1000.0), at(1100.0)


def prompts(count: int, rng: random.Random) -> list[str]:
    systems = [
        f"You are assistant number {k} of the support team. " * 40 for k in range(8)
    ]  # ~2 KB each, shared by many conversations
    out = []
    for i in range(count):
        user = " ".join(
            rng.choice(("order", "refund", "ship", "late", "box", "code")) for _ in range(40)
        )
        out.append(f"{systems[i % len(systems)]}\nuser: {user} #{i}")
    return out


@dataclass
class DecisionSetup:
    """One fleet size: its router, with every strategy resolved and warmed up."""

    pods: int
    router: Router
    requests: list[RoutingRequest]
    strategies: dict[str, Strategy]


def decision_setup(n: int) -> DecisionSetup:
    rng = random.Random(n)
    clock = FrozenClock(10_000.0)
    registry = ModelRegistry()
    registry.replace_all(fleet(n))
    store = MetricsStore(clock=clock)
    inflight = InFlightCounter()
    for pod in registry.lookup(MODEL).routable:
        store.mark_routable(pod.key, clock.now - 60)
        first, second = samples(rng)
        store.record(pod.key, first, now=clock.now - 1.0)
        metrics = store.record(pod.key, second, now=clock.now - 0.1)
        # Every scorer must find its data, or the timings would be of the fallback path.
        needed = (metrics.kv_cache_usage, metrics.ttft_mean_recent, metrics.e2e_mean_recent)
        if None in needed or metrics.running is None or metrics.waiting is None:
            raise RuntimeError(f"incomplete metrics for {pod.key}: {metrics}")
        for _ in range(rng.randint(0, 3)):
            inflight.acquire(MODEL, pod)
    catalog = build_catalog(store, inflight, registry=registry, clock=clock, rng=rng)
    router = Router(registry, catalog, "random", inflight)
    requests = [RoutingRequest(model=MODEL, prompt=p) for p in prompts(64, rng)]
    strategies = {name: router.strategy(name) for name in STRATEGIES}
    for strategy in strategies.values():
        for i in range(50):  # warm caches, the prefix index and the candidate set
            router.release(router.route(requests[i % len(requests)], strategy))
    return DecisionSetup(n, router, requests, strategies)


def decision_costs(mode: RunMode) -> dict[int, dict[str, dict[str, float]]]:
    """p50/p99 per (fleet size, strategy). Passes go over every cell in turn, so a noisy
    moment on the shared machine falls on many cells rather than all samples of one;
    each cell reports the median over passes of the pass's p50 and p99."""
    setups = [decision_setup(n) for n in SIZES]
    passes: dict[tuple[int, str], list[list[float]]] = {
        (setup.pods, name): [] for setup in setups for name in STRATEGIES
    }
    fallbacks = _fallbacks()
    perf = time.perf_counter_ns
    for _ in range(PASSES):
        for setup in setups:
            router, requests = setup.router, setup.requests
            for name, strategy in setup.strategies.items():
                times: list[float] = []
                for i in bounded(mode.pick(700, 100), mode.pick(1.0, 0.2), min_count=50):
                    request = requests[i % len(requests)]
                    started = perf()
                    decision = router.route(request, strategy)
                    times.append((perf() - started) / 1000)
                    router.release(decision)
                passes[(setup.pods, name)].append(times)
    if _fallbacks() != fallbacks:
        raise RuntimeError("a strategy fell back to random: not the path to time")
    return {
        n: {
            name: {
                "p50_us": median([percentile(t, 50) for t in passes[(n, name)]]),
                "p99_us": median([percentile(t, 99) for t in passes[(n, name)]]),
                "count": sum(len(t) for t in passes[(n, name)]),
            }
            for name in STRATEGIES
        }
        for n in SIZES
    }


def _fallbacks() -> float:
    """Routing fallbacks counted so far (gateway_routing_fallback_total, all series)."""
    return sum(
        s.value
        for metric in telemetry.ROUTING_FALLBACK.collect()
        for s in metric.samples
        if s.name.endswith("_total")
    )


def simulator_metrics_text() -> str:
    """What `gateway-extproc simulate` serves at /metrics (fewer families than vLLM)."""
    config = SimulatorConfig(models=(MODEL,))
    metrics = EngineMetrics(config, lambda: EngineSnapshot(3, 1, 0.42, (), ()))
    metrics.prompt_tokens.inc(12345)
    metrics.time_to_first_token.observe(0.05)
    return metrics.render().decode()


def parse_costs(mode: RunMode) -> dict[str, dict[str, float]]:
    out = {}
    for label, text in (
        ("vLLM V1 page (synthesised, all families)", payloads.vllm_metrics_text()),
        ("gateway-extproc simulate page", simulator_metrics_text()),
    ):
        store = MetricsStore()
        parse_us: list[float] = []
        record_us: list[float] = []
        for _ in bounded(mode.pick(2000, 200), mode.pick(3.0, 0.5)):
            started = time.perf_counter_ns()
            parsed = parse_engine_metrics(text)
            middle = time.perf_counter_ns()
            store.record("bench/pod-0", parsed)
            record_us.append((time.perf_counter_ns() - middle) / 1000)
            parse_us.append((middle - started) / 1000)
        out[label] = {
            "bytes": len(text.encode()),
            "lines": text.count("\n"),
            "parse_p50_us": percentile(parse_us, 50),
            "record_p50_us": percentile(record_us, 50),
        }
    return out


async def _scrape_rounds(address: str, n: int, rounds: int) -> dict[str, float]:
    registry = ModelRegistry()
    registry.replace_all(
        [
            Pod(name=f"pod-{i}", namespace="bench", address=address, models=(MODEL,))
            for i in range(n)
        ]
    )
    store = MetricsStore()
    # A long interval: the scraper's own loop runs one round at start and then sleeps;
    # the measured rounds are the ones started here.
    scraper = MetricsScraper(registry, store, interval=3600.0, timeout=5.0)
    await scraper.start()
    try:
        await scraper.scrape_once()  # warm-up: connections opened
        walls, cpus = [], []
        for _ in range(rounds):
            cpu0, wall0 = time.process_time(), time.perf_counter()
            await scraper.scrape_once()
            walls.append(time.perf_counter() - wall0)
            cpus.append(time.process_time() - cpu0)
        fresh = len(store.fresh())
    finally:
        await scraper.stop()
    if fresh != n:
        raise RuntimeError(f"scrape round left {n - fresh} of {n} pods without metrics")
    return {
        "round_wall_ms": percentile(walls, 50) * 1e3,
        "round_cpu_ms": percentile(cpus, 50) * 1e3,
        "cpu_us_per_pod": percentile(cpus, 50) / n * 1e6,
    }


def scrape_rounds(mode: RunMode) -> dict[int, dict[str, float]]:
    log_dir = mode.work_dir / "routing"
    port, admin = localstack.free_port(), localstack.free_port()
    pod = start_pod_envoy(log_dir, port, admin)
    try:
        localstack.wait_ready([pod])
        address = f"{localstack.LOCALHOST}:{port}"
        return {n: uvloop.run(_scrape_rounds(address, n, mode.pick(5, 2))) for n in SCRAPE_SIZES}
    finally:
        pod.stop()


def run(mode: RunMode) -> Section:
    decisions = decision_costs(mode)
    parses = parse_costs(mode)
    scrapes = scrape_rounds(mode)
    section = Section(
        NAME, TITLE, data={"decisions": decisions, "parse": parses, "scrape_rounds": scrapes}
    )
    rows = []
    for name in STRATEGIES:
        row = [f"`{name}`"]
        for n in SIZES:
            cell = decisions[n][name]
            mark = ""
            if n == TARGET_PODS:
                mark = " ✓" if cell["p99_us"] <= TARGET_P99_US else " ✗"
            row.append(f"{fmt(cell['p50_us'], 1)} / {fmt(cell['p99_us'], 1)}{mark}")
        rows.append(row)
    at_target = {name: decisions[TARGET_PODS][name]["p99_us"] for name in STRATEGIES}
    meeting = [n for n, v in at_target.items() if v <= TARGET_P99_US]
    missing = [n for n, v in at_target.items() if v > TARGET_P99_US]
    counts = sorted({c["count"] for d in decisions.values() for c in d.values()})
    parse_rows = [
        [
            label,
            f"{v['bytes'] / 1024:.1f} KiB, {v['lines']} lines",
            fmt(v["parse_p50_us"], 1),
            fmt(v["record_p50_us"], 1),
        ]
        for label, v in parses.items()
    ]
    scrape_rows = [
        [str(n), fmt(v["round_wall_ms"], 1), fmt(v["round_cpu_ms"], 1), fmt(v["cpu_us_per_pod"], 0)]
        for n, v in scrapes.items()
    ]
    section.body = "\n\n".join(
        [
            f"One `Router.route` call, p50 / p99 in µs: {PASSES} passes over all cells "
            f"({counts[0]}-{counts[-1]} timed calls per cell in all, after 50 warm-up "
            "calls, bounded in time), median of the passes' p50 and p99. ✓/✗: p99 within "
            f"{TARGET_P99_US:.0f} µs at {TARGET_PODS:,} pods. The weighted combination is "
            f"`{WEIGHTED}`.",
            table(["strategy", *(f"{n:,} pods" for n in SIZES)], rows),
            f"At {TARGET_PODS:,} pods, p99 within {TARGET_P99_US:.0f} µs: "
            + (", ".join(f"`{n}` ({at_target[n]:.0f} µs)" for n in meeting) or "none")
            + "; over it: "
            + (", ".join(f"`{n}` ({at_target[n]:.0f} µs)" for n in missing) or "none")
            + ".",
            "Parsing one /metrics page and recording it in the store (p50, µs):",
            table(["page", "size", "parse µs", "store.record µs"], parse_rows),
            "One scrape round of the real MetricsScraper (aiohttp, concurrency 64) over N "
            "pods, all served by one static Envoy with the vLLM page above (median of "
            "the rounds; CPU is this process's, i.e. the scraper's):",
            table(["pods", "round wall ms", "round CPU ms", "CPU µs per pod scrape"], scrape_rows),
        ]
    )
    worst = max(at_target, key=lambda k: at_target[k])
    section.targets = [
        Target(
            f"one routing decision over {TARGET_PODS:,} pods, p99 (every strategy)",
            f"<= {TARGET_P99_US:.0f} µs",
            f"{len(meeting)} of {len(STRATEGIES)} strategies meet it; worst `{worst}` "
            f"{at_target[worst]:.0f} µs",
            not missing,
        )
    ]
    section.body += "\n\nTargets: " + "; ".join(
        f"{t.name} {t.goal}: {t.figure}, {met_mark(t.met)}" for t in section.targets
    )
    return section
