"""Benchmark 3: the cost of one routing decision and of keeping engine metrics current.

Decision: one `Router.route` call, in process, on the real Router, catalog
(`build_catalog`), registry, metrics store and in-flight counter, for one model served by
N pods. Every pod has fresh metrics (two scrapes recorded, so rates and recent means
exist) and a few requests in flight. Prompts are 64 chat conversations sharing system
prompts, so the prefix index holds real entries. The timed call includes what the router
does per request (model lookup, strategy, pick-time routability check, in-flight count,
decision histogram); the release afterwards is not timed.

Two cases. Frozen: the store's clock stands still and nothing is recorded while the loop
runs, so every decision reuses what the previous one derived from the metrics. Live: as
in operation, the scraper keeps recording. Between two decisions (untimed), the next pods
in a round-robin over the fleet record a new scrape (gauges redrawn, counters grown), and
the clock moves on by the time those scrapes take at the scraper's own pace: a round over
N pods every max(interval, N / max_scrapes_per_second) seconds (MetricsScraper defaults:
0.2 s, 1,000/s, so 1 s at 1,000 pods), at LIVE_DECISIONS_PER_SECOND decisions per second.
A sweep at 1,000 pods shows the cost as the scrapes per decision grow (a slower request
rate, or a round's scrapes landing in a burst).

Scrape cost: parsing one vLLM /metrics page (`parse_engine_metrics` plus the store's
`record`), and one scrape round of the real MetricsScraper over N pods, all served by one
static Envoy (bench.stack's pod) over aiohttp keep-alive connections.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
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
from gateway_extproc import telemetry
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.simulator.config import SimulatorConfig
from gateway_extproc.devtools.simulator.metrics import EngineMetrics, EngineSnapshot
from gateway_extproc.metrics.parser import EngineSample, parse_engine_metrics
from gateway_extproc.metrics.scraper import MetricsScraper
from gateway_extproc.metrics.store import MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.routing.base import RoutingRequest, Strategy
from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.router import Router

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
    "predicted-latency",  # the default
)
TARGET_PODS = 1000
TARGET_P99_US = 200.0
SCRAPE_SIZES = (10, 100, 1000)
PASSES = 3
# Decisions per second for the live case: about a third of the ~750 requests/s one
# processor serves through Envoy on this VM (overhead section), i.e. a fleet of processors
# sized with headroom. A busier processor sees fewer scrapes per decision.
LIVE_DECISIONS_PER_SECOND = 250.0
# Scrapes recorded before each decision in the sweep at TARGET_PODS (1 is a processor at
# ~1,000 decisions/s; 16 and 64 are ~60 and ~15 decisions/s at the scraper's pace).
SWEEP_SCRAPES = (1.0, 4.0, 16.0, 64.0)


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


def engine(rng: random.Random) -> Iterator[EngineSample]:
    """Successive scrapes of one engine: gauges as they are, counters and histogram sums
    grown at this engine's own (random) rates, so every derived value exists."""
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

    requests = 1000.0
    while True:
        yield at(requests)
        requests += 100.0


def samples(rng: random.Random) -> tuple[EngineSample, EngineSample]:
    """Two successive scrapes of one engine."""
    scrapes = engine(rng)
    return next(scrapes), next(scrapes)


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


class LiveScrapes:
    """Records scrapes between decisions as the scraper does in operation: pods in turn,
    `per_decision` of them on average before each decision, each moving the clock on by
    the time between two scrapes at the scraper's pace, so every pod is scraped once per
    round; at the end of each round the store hears that it completed, as the scraper
    tells it, so a round longer than the staleness keeps its metrics fresh."""

    def __init__(
        self,
        store: MetricsStore,
        clock: FrozenClock,
        engines: dict[str, Iterator[EngineSample]],
        per_decision: float,
        period: float,
    ) -> None:
        self.store = store
        self.clock = clock
        self.engines = engines
        self.keys = list(engines)
        self.per_decision = per_decision
        self.step = period / len(self.keys)
        self.next = 0
        self.due = 0.0
        self.round_started = clock.now

    def __call__(self) -> None:
        self.due += self.per_decision
        while self.due >= 1.0:
            self.due -= 1.0
            key = self.keys[self.next]
            self.next = (self.next + 1) % len(self.keys)
            self.clock.now += self.step
            self.store.record(key, next(self.engines[key]), now=self.clock.now)
            if self.next == 0:
                self.store.round_completed(self.round_started, self.clock.now - self.round_started)
                self.round_started = self.clock.now


def scrape_period(n: int) -> float:
    """The real scraper's round period over n pods, with its default settings."""
    scraper = MetricsScraper(ModelRegistry(), MetricsStore())
    return max(scraper.interval, n / scraper.max_scrapes_per_second)


def live_sizes() -> tuple[int, ...]:
    """Every fleet size: a round longer than the staleness (5,000 pods: 5 s against 2 s)
    keeps its metrics fresh until the next round completes (metrics/store.py)."""
    return SIZES


def live_per_decision(n: int) -> float:
    """Scrapes recorded per decision at the scraper's pace and LIVE_DECISIONS_PER_SECOND."""
    return n / scrape_period(n) / LIVE_DECISIONS_PER_SECOND


@dataclass
class DecisionSetup:
    """One fleet size: its router, with every strategy resolved and warmed up, and what
    happens between two decisions (nothing when frozen)."""

    pods: int
    router: Router
    requests: list[RoutingRequest]
    strategies: dict[str, Strategy]
    between: Callable[[], None]


def decision_setup(n: int, per_decision: float = 0.0) -> DecisionSetup:
    """Frozen when `per_decision` is 0; else live, with that many scrapes per decision."""
    rng = random.Random(n)
    clock = FrozenClock(10_000.0)
    registry = ModelRegistry()
    registry.replace_all(fleet(n))
    store = MetricsStore(clock=clock)
    inflight = InFlightCounter()
    engines: dict[str, Iterator[EngineSample]] = {}
    for pod in registry.lookup(MODEL).routable:
        store.mark_routable(pod.key, clock.now - 60)
        scrapes = engines[pod.key] = engine(rng)
        store.record(pod.key, next(scrapes), now=clock.now - 1.0)
        metrics = store.record(pod.key, next(scrapes), now=clock.now - 0.1)
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
    between: Callable[[], None] = _frozen
    if per_decision > 0:
        # The scrapes above stand for the round before: completed, as the scraper says.
        store.round_completed(clock.now - scrape_period(n), scrape_period(n))
        between = LiveScrapes(store, clock, engines, per_decision, scrape_period(n))
    for strategy in strategies.values():
        for i in range(50):  # warm caches, the prefix index and the candidate set
            between()
            router.release(router.route(requests[i % len(requests)], strategy))
    return DecisionSetup(n, router, requests, strategies, between)


def _frozen() -> None:
    """Between two frozen decisions nothing happens."""


Cells = dict[str, dict[str, float]]  # strategy -> p50_us, p99_us, count


def decision_costs(mode: RunMode) -> dict[str, Cells]:
    """p50/p99 per (case, strategy), the cases being `frozen N`, `live N` (N pods) and
    `sweep K` (live at TARGET_PODS, K scrapes per decision). Passes go over every cell
    in turn, so a noisy moment on the shared machine falls on many cells rather than all
    samples of one; each cell reports the median over passes of the pass's p50 and p99."""
    setups = {f"frozen {n}": decision_setup(n) for n in SIZES}
    setups.update({f"live {n}": decision_setup(n, live_per_decision(n)) for n in live_sizes()})
    live_target = live_per_decision(TARGET_PODS)
    setups.update(
        {
            f"sweep {k:g}": decision_setup(TARGET_PODS, k)
            for k in SWEEP_SCRAPES
            if k != live_target  # that cell is the live one
        }
    )
    passes: dict[tuple[str, str], list[list[float]]] = {
        (case, name): [] for case in setups for name in STRATEGIES
    }
    fallbacks = _fallbacks()
    perf = time.perf_counter_ns
    for _ in range(PASSES):
        for case, setup in setups.items():
            router, requests, between = setup.router, setup.requests, setup.between
            for name, strategy in setup.strategies.items():
                times: list[float] = []
                for i in bounded(mode.pick(700, 100), mode.pick(1.0, 0.2), min_count=50):
                    between()
                    request = requests[i % len(requests)]
                    started = perf()
                    decision = router.route(request, strategy)
                    times.append((perf() - started) / 1000)
                    router.release(decision)
                passes[(case, name)].append(times)
    if _fallbacks() != fallbacks:
        raise RuntimeError("a strategy fell back to random: not the path to time")
    out = {
        case: {
            name: {
                "p50_us": median([percentile(t, 50) for t in passes[(case, name)]]),
                "p99_us": median([percentile(t, 99) for t in passes[(case, name)]]),
                "count": sum(len(t) for t in passes[(case, name)]),
            }
            for name in STRATEGIES
        }
        for case in setups
    }
    if live_target in SWEEP_SCRAPES:
        out[f"sweep {live_target:g}"] = out[f"live {TARGET_PODS}"]
    return out


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


def _cell(cell: dict[str, float], target: bool) -> str:
    mark = (" ✓" if cell["p99_us"] <= TARGET_P99_US else " ✗") if target else ""
    return f"{fmt(cell['p50_us'], 1)} / {fmt(cell['p99_us'], 1)}{mark}"


def run(mode: RunMode) -> Section:
    costs = decision_costs(mode)
    parses = parse_costs(mode)
    scrapes = scrape_rounds(mode)
    frozen = {n: costs[f"frozen {n}"] for n in SIZES}
    live = {n: costs[f"live {n}"] for n in live_sizes()}
    sweep = {k: costs[f"sweep {k:g}"] for k in SWEEP_SCRAPES}
    section = Section(
        NAME,
        TITLE,
        data={
            "decisions": frozen,
            "live": live,
            "live_scrapes_per_decision": {n: live_per_decision(n) for n in live_sizes()},
            "sweep": sweep,
            "parse": parses,
            "scrape_rounds": scrapes,
        },
    )
    sizes_header = ["strategy", *(f"{n:,} pods" for n in SIZES)]
    frozen_rows = [
        [f"`{name}`", *(_cell(frozen[n][name], n == TARGET_PODS) for n in SIZES)]
        for name in STRATEGIES
    ]
    live_rows = [
        [
            f"`{name}`",
            *(_cell(live[n][name], n == TARGET_PODS) if n in live else "n/a" for n in SIZES),
        ]
        for name in STRATEGIES
    ]
    sweep_rows = [
        [f"`{name}`", *(_cell(sweep[k][name], True) for k in SWEEP_SCRAPES)] for name in STRATEGIES
    ]
    at_target = {name: live[TARGET_PODS][name]["p99_us"] for name in STRATEGIES}
    frozen_at_target = {name: frozen[TARGET_PODS][name]["p99_us"] for name in STRATEGIES}
    meeting = [n for n, v in at_target.items() if v <= TARGET_P99_US]
    missing = [n for n, v in at_target.items() if v > TARGET_P99_US]
    counts = sorted({c["count"] for d in costs.values() for c in d.values()})
    per_decision = ", ".join(f"{live_per_decision(n):g} at {n:,}" for n in live_sizes())
    stale = [n for n in SIZES if n not in live]
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
            "**Live** (the figures that count): as in operation, the scraper keeps "
            "recording while requests are routed. Before each decision (untimed) the next "
            "pods in turn record a new scrape (gauges redrawn, counters grown) and the "
            "store's clock moves on by the time those scrapes take at the real scraper's "
            "pace, one round over N pods every max(0.2 s interval, N / 1,000 scrapes/s), "
            f"with {LIVE_DECISIONS_PER_SECOND:g} decisions per second: about a third of "
            "what one processor serves through Envoy here (overhead section). That is "
            f"{per_decision} pods scraped per decision (below 1: a scrape every few "
            "decisions). Every pod stays fresh"
            + (
                "; n/a at "
                + ", ".join(f"{n:,}" for n in stale)
                + " pods: there a round takes "
                + ", ".join(f"{scrape_period(n):g} s" for n in stale)
                + f", longer than the {MetricsStore().staleness:g} s default staleness, so "
                "with the default settings metrics go stale between two scrapes of a pod "
                "and the metric strategies fall back to random (raise "
                "`--metrics-staleness` for such fleets)."
                if stale
                else "."
            ),
            table(sizes_header, live_rows),
            f"**Live at {TARGET_PODS:,} pods, by scrapes recorded per decision** (1: a "
            "processor at ~1,000 decisions/s with the scraper at its 1,000 scrapes/s cap; "
            "16 and 64: ~60 and ~15 decisions/s, or a round's scrapes landing in a burst):",
            table(
                ["strategy", *(f"{k:g} per decision" for k in SWEEP_SCRAPES)],
                sweep_rows,
            ),
            "**Frozen**: the store's clock stands still and nothing is recorded during "
            "the loop, so every decision reuses what earlier ones derived from the metrics: "
            "a floor, not what operation sees.",
            table(sizes_header, frozen_rows),
            f"At {TARGET_PODS:,} pods, live, p99 within {TARGET_P99_US:.0f} µs: "
            + (", ".join(f"`{n}` ({at_target[n]:.0f} µs)" for n in meeting) or "none")
            + "; over it: "
            + (", ".join(f"`{n}` ({at_target[n]:.0f} µs)" for n in missing) or "none")
            + f". Frozen, the worst is `{max(frozen_at_target, key=frozen_at_target.__getitem__)}`"
            f" ({max(frozen_at_target.values()):.0f} µs).",
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
            f"one routing decision over {TARGET_PODS:,} pods, p99 (every strategy), live scraping",
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
