"""Benchmark 4: routing quality on simulated engines, each strategy against `random`.

Through the real path: the front Envoy (envoy/envoy.yaml), the processor
(`gateway-extproc serve`, scraping the engines' /metrics, counting its own in-flight
requests, reading prompts for the prefix index) and four `gateway-extproc simulate`
processes. That is the honest choice: a strategy is only as good as the signals it gets
in production (scrape delay, stale metrics, in-flight counts that move when the response
ends), and an in-process router with perfect knowledge would flatter the metric-driven
ones. The price is CPU noise, since everything shares two cores; every strategy gets the
same seeded workload and a freshly started set of processes (empty caches, no history),
and the strategy is chosen per request with the `routing-strategy` header.

The client streams every request (stream: true) and measures time to first token (first
`data:` bytes) and output tokens per second. Scenarios:

a. multi-turn chat with shared prefixes: users of 6 tenants, each tenant a long system
   prompt (1,200 tokens), several turns per user; an engine's KV cache holds about half
   the tenants' prompts, so where a conversation lands decides whether its prefill is
   cached;
b. bursty uniform load: bursts of unrelated requests as large as the fleet's batch slots,
   so only an even spread avoids queueing;
c. one slow pod among four (slow_factor via POST /admin/faults) under steady load.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.common import RunMode, Section, Target, fmt, met_mark, percentile, table
from bench.stack import write_models_file
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ProcessGroup

NAME = "quality"
TITLE = "4. Routing quality on simulated engines"
MODEL = "chat-model"
PODS = 4
WEIGHTED = "prefix-cache:3,least-kv-cache:2,least-request:2"
TENANTS = 6
WORDS = [
    "order",
    "shipping",
    "refund",
    "invoice",
    "account",
    "password",
    "device",
    "network",
    "printer",
    "battery",
    "screen",
    "update",
    "install",
    "license",
    "warranty",
    "delivery",
    "address",
    "payment",
    "card",
    "balance",
    "travel",
    "booking",
    "flight",
    "hotel",
    "insurance",
    "claim",
    "policy",
    "meeting",
    "schedule",
    "report",
    "budget",
    "project",
    "deadline",
    "contract",
    "supplier",
    "customer",
    "product",
    "feature",
    "release",
    "version",
    "bug",
]


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    simulator_args: tuple[str, ...]
    strategies: tuple[str, ...]
    aim: str  # what the project hopes to see, in words
    slow_pod: float = 0.0  # slow_factor for pod 0 (0: none)


@dataclass
class Result:
    ttft_s: float
    tokens: int
    pod: str
    reply: str


@dataclass
class RunStats:
    strategy: str
    results: list[Result] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    hit_rate: float = float("nan")

    def summary(self) -> dict[str, Any]:
        ttfts = [r.ttft_s * 1e3 for r in self.results]
        tokens = sum(r.tokens for r in self.results)
        pods = Counter(r.pod for r in self.results)
        return {
            "strategy": self.strategy,
            "requests": len(self.results),
            "errors": self.errors,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p90_ms": percentile(ttfts, 90),
            "ttft_p99_ms": percentile(ttfts, 99),
            "tokens_per_s": tokens / self.wall_s if self.wall_s else 0.0,
            "wall_s": self.wall_s,
            "pod_shares": {pod: n / len(self.results) for pod, n in sorted(pods.items())}
            if self.results
            else {},
            "prefix_hit_rate": self.hit_rate,
        }


# -- the fleet -------------------------------------------------------------------------


@dataclass
class Fleet:
    group: ProcessGroup
    front_port: int
    processor_admin: int
    simulator_ports: list[int]


def start_fleet(log_dir: Path, simulator_args: tuple[str, ...]) -> Fleet:
    group = ProcessGroup()
    env = localstack.environment_without_gateway_settings()
    try:
        ports = [localstack.free_port() for _ in range(PODS)]
        for i, port in enumerate(ports):
            group.add(
                localstack.start_simulator(
                    port,
                    [MODEL],
                    log_dir,
                    extra_args=[*simulator_args, "--seed", str(i)],
                    env=env,
                )
            )
        localstack.wait_ready(group, timeout=30)
        models = write_models_file(
            log_dir / "models.yaml",
            {MODEL: [(f"pod-{i}", f"{LOCALHOST}:{port}") for i, port in enumerate(ports)]},
        )
        grpc_port, admin = localstack.free_port(), localstack.free_port()
        processor = group.add(
            localstack.start_processor(
                models,
                log_dir,
                grpc_port=grpc_port,
                admin_port=admin,
                # A fixed seed: the same workload routes the same way on every run
                # (random's figures drifted between runs without it).
                extra_args=["--log-format", "json", "--log-level", "info", "--routing-seed", "1"],
                env=env,
            )
        )
        localstack.wait_ready([processor], timeout=30)
        front_port, front_admin = localstack.free_port(), localstack.free_port()
        front = group.add(
            localstack.start_envoy(
                localstack.repo_file(localstack.ENVOY_CONFIG),
                log_dir,
                listen_port=front_port,
                admin_port=front_admin,
                extproc_port=grpc_port,
                concurrency=1,
                name="front-envoy",
            )
        )
        localstack.wait_ready([front])
        wait_for_first_scrapes(admin, PODS)
    except BaseException:
        group.stop()
        raise
    return Fleet(group, front_port, admin, ports)


def wait_for_first_scrapes(admin_port: int, pods: int, timeout: float = 15.0) -> None:
    """Until the processor has scraped every pod once, so no strategy starts blind."""
    deadline = time.monotonic() + timeout
    pattern = re.compile(r"^pod_coldstart_duration_seconds_count (\S+)$", re.MULTILINE)
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{admin_port}/metrics", timeout=2) as r:
            match = pattern.search(r.read().decode())
        if match and float(match.group(1)) >= pods:
            return
        time.sleep(0.1)
    raise RuntimeError("the processor did not scrape every simulated pod in time")


def set_slow(port: int, factor: float) -> None:
    request = urllib.request.Request(
        f"http://{LOCALHOST}:{port}/admin/faults",
        data=json.dumps({"slow_factor": factor}).encode(),
        headers={"content-type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        response.read()


def prefix_hit_rate(ports: list[int]) -> float:
    """Prefix-cache hits / queried prompt tokens over the whole fleet."""
    hits = queries = 0.0
    for port in ports:
        with urllib.request.urlopen(f"http://{LOCALHOST}:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits / queries if queries else float("nan")


# -- the client ------------------------------------------------------------------------


class Client:
    def __init__(self, session: aiohttp.ClientSession, port: int, strategy: str) -> None:
        self._session = session
        self._url = f"http://{LOCALHOST}:{port}/v1/chat/completions"
        self._headers = {"content-type": "application/json", "routing-strategy": strategy}
        self.stats = RunStats(strategy)

    async def chat(
        self, messages: list[dict[str, str]], max_tokens: int, session_id: str = ""
    ) -> Result | None:
        body = orjson.dumps(
            {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "stream": True}
        )
        headers = dict(self._headers)
        if session_id:
            headers["x-session-id"] = session_id
        started = time.perf_counter()
        first = 0.0
        raw = bytearray()
        try:
            async with self._session.post(self._url, data=body, headers=headers) as response:
                if response.status != 200:
                    self.stats.errors += 1
                    await response.read()
                    return None
                pod = response.headers.get("x-simulator-pod", "?")
                async for chunk in response.content.iter_any():
                    if not first and b"data:" in chunk:
                        first = time.perf_counter() - started
                    raw += chunk
        except (aiohttp.ClientError, TimeoutError):
            self.stats.errors += 1
            return None
        reply, tokens = _read_events(bytes(raw))
        result = Result(first, tokens, pod, reply)
        self.stats.results.append(result)
        return result


def _read_events(raw: bytes) -> tuple[str, int]:
    parts = []
    tokens = 0
    for line in raw.split(b"\n"):
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        choices = orjson.loads(line[6:]).get("choices") or []
        if choices:
            content = (choices[0].get("delta") or {}).get("content")
            if content:
                parts.append(content)
                tokens += 1
    return "".join(parts), tokens


# -- workloads -------------------------------------------------------------------------

Workload = Callable[[Client], Awaitable[None]]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def multi_turn_workload(mode: RunMode, seed: int = 11) -> Workload:
    """Users of TENANTS tenants; each user a conversation of several turns with think time."""
    rng = random.Random(seed)
    tenants = [f"You are the assistant of tenant {t}. " + _words(rng, 1200) for t in range(TENANTS)]
    users = mode.pick(36, 24)
    turns = mode.pick(4, 3)
    plans = []
    for u in range(users):
        plans.append(
            {
                "tenant": tenants[rng.randrange(len(tenants))],
                "start": u * mode.pick(0.25, 0.2),
                "messages": [_words(rng, 30) for _ in range(turns)],
                "think": [rng.uniform(0.2, 0.6) for _ in range(turns)],
            }
        )

    async def run(client: Client) -> None:
        async def user(index: int, plan: dict[str, Any]) -> None:
            await asyncio.sleep(plan["start"])
            history = [{"role": "system", "content": plan["tenant"]}]
            for message, think in zip(plan["messages"], plan["think"], strict=True):
                history.append({"role": "user", "content": message})
                result = await client.chat(history, 16, session_id=f"user-{index}")
                if result is None:
                    return
                history.append({"role": "assistant", "content": result.reply})
                await asyncio.sleep(think)

        await asyncio.gather(*(user(i, p) for i, p in enumerate(plans)))

    return run


def burst_workload(mode: RunMode, seed: int = 12) -> Workload:
    """Bursts of unrelated requests, each burst more than the fleet's batch slots."""
    rng = random.Random(seed)
    bursts = mode.pick(8, 3)
    per_burst = 16
    plan = [
        [(_words(rng, 200), rng.randint(16, 48)) for _ in range(per_burst)] for _ in range(bursts)
    ]

    async def run(client: Client) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for b, burst in enumerate(plan):
            await asyncio.sleep(max(0.0, b * 1.0 - (loop.time() - t0)))
            for prompt, max_tokens in burst:
                messages = [{"role": "user", "content": prompt}]
                tasks.append(asyncio.create_task(client.chat(messages, max_tokens)))
        await asyncio.gather(*tasks)

    return run


def steady_workload(mode: RunMode, seed: int = 13) -> Workload:
    """Poisson arrivals of unrelated requests at a rate the healthy pods handle easily."""
    rng = random.Random(seed)
    rate = 24.0
    duration = mode.pick(10.0, 4.0)
    arrivals = []
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= duration:
            break
        arrivals.append((at, _words(rng, 200), 32))

    async def run(client: Client) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for at, prompt, max_tokens in arrivals:
            await asyncio.sleep(max(0.0, at - (loop.time() - t0)))
            tasks.append(
                asyncio.create_task(client.chat([{"role": "user", "content": prompt}], max_tokens))
            )
        await asyncio.gather(*tasks)

    return run


SCENARIOS: tuple[tuple[Scenario, Callable[[RunMode], Workload]], ...] = (
    (
        Scenario(
            "a",
            f"multi-turn chat, {TENANTS} tenants' long system prompts shared across users",
            ("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "200",
             "--kv-blocks", "320", "--max-num-seqs", "16"),
            ("random", "least-request", "session-affinity", "prefix-cache", WEIGHTED),
            "prefix-aware p90 TTFT <= 50% of random's",
        ),
        multi_turn_workload,
    ),
    (
        Scenario(
            "b",
            "bursty uniform load: bursts of 16 unrelated requests each second, 16 batch slots",
            ("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "100",
             "--max-num-seqs", "4"),
            ("random", "least-request", "least-kv-cache", "least-latency"),
            "load-aware p90 TTFT below random's",
        ),
        burst_workload,
    ),
    (
        Scenario(
            "c",
            "one slow pod among four (slow_factor 4), steady 24 req/s",
            ("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "100",
             "--max-num-seqs", "8"),
            ("random", "least-request", "least-latency", "least-kv-cache"),
            "load-aware clearly ahead of random (p90 TTFT <= 75% of random's)",
            slow_pod=4.0,
        ),
        steady_workload,
    ),
)  # fmt: skip


async def _drive(fleet: Fleet, strategy: str, workload: Workload, limit_s: float) -> RunStats:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, fleet.front_port, strategy)
        started = time.perf_counter()
        async with asyncio.timeout(limit_s):
            await workload(client)
        client.stats.wall_s = time.perf_counter() - started
    return client.stats


def run_scenario(scenario: Scenario, workload: Workload, mode: RunMode) -> list[dict[str, Any]]:
    out = []
    for index, strategy in enumerate(scenario.strategies):
        log_dir = mode.work_dir / NAME / f"{scenario.key}-{index}"
        fleet = start_fleet(log_dir, scenario.simulator_args)
        try:
            if scenario.slow_pod:
                set_slow(fleet.simulator_ports[0], scenario.slow_pod)
            stats = uvloop.run(_drive(fleet, strategy, workload, mode.pick(120.0, 60.0)))
            stats.hit_rate = prefix_hit_rate(fleet.simulator_ports)
        finally:
            fleet.group.stop()
        summary = stats.summary()
        if scenario.slow_pod:
            slow = f"{LOCALHOST}:{fleet.simulator_ports[0]}"
            summary["slow_pod_share"] = summary["pod_shares"].get(slow, 0.0)
        out.append(summary)
    return out


def _versus(ratio: float, run: dict[str, Any], base: dict[str, Any]) -> str:
    return f"{ratio * 100:.0f}% ({run['ttft_p90_ms']:.0f} vs {base['ttft_p90_ms']:.0f} ms)"


def _verdicts(scenario: Scenario, runs: list[dict[str, Any]]) -> list[Target]:
    base = next(r for r in runs if r["strategy"] == "random")
    targets = []
    if scenario.key == "a":
        for name in ("prefix-cache", WEIGHTED):
            run = next(r for r in runs if r["strategy"] == name)
            ratio = run["ttft_p90_ms"] / base["ttft_p90_ms"]
            targets.append(
                Target(
                    f"aim (a): `{name}` p90 TTFT vs random, shared prefixes",
                    "<= 50% of random",
                    _versus(ratio, run, base),
                    ratio <= 0.5,
                )
            )
    else:
        limit = 1.0 if scenario.key == "b" else 0.75
        for run in runs:
            if run["strategy"] == "random":
                continue
            ratio = run["ttft_p90_ms"] / base["ttft_p90_ms"]
            targets.append(
                Target(
                    f"aim ({scenario.key}): `{run['strategy']}` p90 TTFT vs random, "
                    + ("bursts" if scenario.key == "b" else "one slow pod"),
                    f"< {limit * 100:.0f}% of random",
                    _versus(ratio, run, base),
                    ratio < limit if scenario.key == "b" else ratio <= limit,
                )
            )
    return targets


def run(mode: RunMode) -> Section:
    data: dict[str, Any] = {}
    parts = []
    targets: list[Target] = []
    for scenario, make_workload in SCENARIOS:
        runs = run_scenario(scenario, make_workload(mode), mode)
        data[scenario.key] = {
            "title": scenario.title,
            "args": scenario.simulator_args,
            "runs": runs,
        }
        base = next(r for r in runs if r["strategy"] == "random")
        rows = []
        for r in runs:
            if scenario.key == "a":
                share = r["prefix_hit_rate"]
            elif scenario.key == "c":
                share = r["slow_pod_share"]
            else:
                share = max(r["pod_shares"].values(), default=0.0)
            extra = f"{share * 100:.0f}%"
            rows.append(
                [
                    f"`{r['strategy']}`",
                    str(r["requests"]) + (f" ({r['errors']} errors)" if r["errors"] else ""),
                    fmt(r["ttft_p50_ms"], 0),
                    fmt(r["ttft_p90_ms"], 0),
                    f"{r['ttft_p90_ms'] / base['ttft_p90_ms'] * 100:.0f}%",
                    fmt(r["ttft_p99_ms"], 0),
                    fmt(r["tokens_per_s"], 0),
                    extra,
                ]
            )
        extra_header = {
            "a": "engine prefix-cache hit rate",
            "b": "busiest pod's share",
            "c": "slow pod's share",
        }[scenario.key]
        parts.append(
            f"**({scenario.key}) {scenario.title}.** Simulators: "
            f"`{' '.join(scenario.simulator_args)}`. Aim: {scenario.aim}."
        )
        parts.append(
            table(
                [
                    "strategy",
                    "requests",
                    "TTFT p50 ms",
                    "TTFT p90 ms",
                    "p90 vs random",
                    "TTFT p99 ms",
                    "output tokens/s",
                    extra_header,
                ],
                rows,
            )
        )
        targets += _verdicts(scenario, runs)
    section = Section(NAME, TITLE, data=data, targets=targets)
    section.body = "\n\n".join(
        [
            "Four `gateway-extproc simulate` processes behind the real front Envoy and "
            "processor (see the module docstring of bench/quality.py for why this path "
            "rather than in-process routing). Every strategy gets the same seeded "
            "workload and a fresh set of processes. TTFT is measured by the client, from "
            "sending the request to the first streamed token; output tokens/s is over the "
            "run's wall time.",
            *parts,
            "Aims: "
            + "; ".join(f"{t.name} {t.goal}: {t.figure}, {met_mark(t.met)}" for t in targets),
        ]
    )
    return section
