"""Benchmark 4: routing quality on simulated engines, each strategy against `random`.

Through the real path: the front Envoy (envoy/envoy.yaml), the processor
(`gateway-extproc serve`, scraping the engines' /metrics, counting its own in-flight
requests, reading prompts for the prefix index, timing responses) and four
`gateway-extproc simulate` processes. That is the honest choice: a strategy is only as
good as the signals it gets in production (scrape delay, stale metrics, in-flight counts
that move when the response ends), and an in-process router with perfect knowledge would
flatter the metric-driven ones. The price is CPU noise, since everything shares two
cores. So every variant gets the same seeded workload and a freshly started set of
processes (empty caches, no history); the variants of a workload run interleaved, seed
by seed, and each is judged by its ratio to `random` on the same seed. The strategy is
chosen per request with the `routing-strategy` header; the `default` variant sends none,
so it measures what a user who configures nothing gets.

Seeds: every workload runs on TUNING_SEEDS (the ones looked at while the default profile
was tuned) and on HELD_OUT_SEEDS (never looked at before the final run): prompts, arrival
times, tenants and the processor's routing seed all change with the seed. Verdicts are
taken on the held-out seeds; both are reported.

The client streams every request (stream: true) and measures time to first token (first
`data:` bytes). The fleet's prefix-cache hit rate is the engines' own
(vllm:prefix_cache_hits / queries, summed over the four engines, over the run).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
import yaml

from bench.common import RunMode, Section, Target, fmt, met_mark, percentile, table
from bench.stack import add_processor_endpoints, start_front_envoy, write_models_file
from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ProcessGroup

NAME = "quality"
TITLE = "4. Routing quality on simulated engines"
MODEL = "chat-model"
PODS = 4
TUNING_SEEDS = (1, 2)
HELD_OUT_SEEDS = (3, 4)
# The default's p90 TTFT must never be above random's on any workload.
NEVER_WORSE = 1.0
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
class Variant:
    """One way of routing a workload: a strategy (by header; "" sends none, so the
    processor's default routes) behind one or more processor processes."""

    label: str
    strategy: str
    processors: int = 1
    # The processors share a redis-server (--redis-url): prefix placements, sessions.
    redis: bool = False


RANDOM = Variant("random", "random")
DEFAULT = Variant("default (no header)", "")
TWO_PROCESSORS = Variant("default, 2 processors", "", processors=2)
TWO_PROCESSORS_REDIS = Variant("default, 2 processors, Redis", "", processors=2, redis=True)
LEAST_REQUEST = Variant("least-request", "least-request")
LEAST_LATENCY = Variant("least-latency", "least-latency")
LEAST_KV = Variant("least-kv-cache", "least-kv-cache")
PREFIX = Variant("prefix-cache", "prefix-cache")
PRECISE = Variant("precise-prefix-cache", "precise-prefix-cache")
PRECISE_TWO = Variant("precise-prefix-cache, 2 processors", "precise-prefix-cache", processors=2)


@dataclass
class Result:
    ttft_s: float
    tokens: int
    pod: str
    reply: str


@dataclass
class RunStats:
    variant: Variant
    seed: int
    results: list[Result] = field(default_factory=list)
    errors: int = 0
    wall_s: float = 0.0
    hit_rate: float = float("nan")
    slow_pod: str = ""
    pods: list[str] = field(default_factory=list)  # addresses, in pod order

    def summary(self) -> dict[str, Any]:
        ttfts = [r.ttft_s * 1e3 for r in self.results]
        pods = Counter(r.pod for r in self.results)
        shares = (
            {pod: n / len(self.results) for pod, n in sorted(pods.items())} if self.results else {}
        )
        return {
            "variant": self.variant.label,
            "strategy": self.variant.strategy,
            "processors": self.variant.processors,
            "seed": self.seed,
            "requests": len(self.results),
            "errors": self.errors,
            "ttft_p50_ms": percentile(ttfts, 50),
            "ttft_p90_ms": percentile(ttfts, 90),
            "ttft_p99_ms": percentile(ttfts, 99),
            "wall_s": self.wall_s,
            "pod_shares": shares,
            "shares_by_pod": [round(shares.get(pod, 0.0), 3) for pod in self.pods],
            "slow_pod_share": shares.get(self.slow_pod, 0.0) if self.slow_pod else None,
            "prefix_hit_rate": self.hit_rate,
        }


# -- the client ------------------------------------------------------------------------


class Client:
    def __init__(self, session: aiohttp.ClientSession, port: int, stats: RunStats) -> None:
        self._session = session
        self._url = f"http://{LOCALHOST}:{port}/v1/chat/completions"
        self._headers = {"content-type": "application/json"}
        if stats.variant.strategy:
            self._headers["routing-strategy"] = stats.variant.strategy
        self.stats = stats

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
# (prompt messages, max_tokens) sent at a time offset (seconds from the start)
Arrival = tuple[float, list[dict[str, str]], int]


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(count))


def _system_prompts(rng: random.Random, count: int, words: int) -> list[str]:
    return [f"You are the assistant of tenant {t}. " + _words(rng, words) for t in range(count)]


def _open_loop(arrivals: list[Arrival]) -> Workload:
    """Send each request at its time, whether or not earlier ones have been answered."""

    async def run(client: Client) -> None:
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tasks = []
        for at, messages, max_tokens in arrivals:
            await asyncio.sleep(max(0.0, at - (loop.time() - t0)))
            tasks.append(asyncio.create_task(client.chat(messages, max_tokens)))
        await asyncio.gather(*tasks)

    return run


def _poisson(rng: random.Random, rate: float, duration: float) -> list[float]:
    times: list[float] = []
    at = 0.0
    while True:
        at += rng.expovariate(rate)
        if at >= duration:
            return times
        times.append(at)


def multi_turn_workload(mode: RunMode, seed: int) -> Workload:
    """Users of 6 tenants; each user a conversation of several turns with think time."""
    rng = random.Random(seed)
    tenants = _system_prompts(rng, 6, 1200)
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


def tight_cache_workload(mode: RunMode, seed: int) -> Workload:
    """8 tenants' long system prompts (about 45 KV blocks each), one question per
    request, Poisson arrivals, tenants drawn uniformly: the fleet serves 8 prompts and
    each engine's cache holds about 3, so the fleet holds them all only if every pod
    keeps its own two or three."""
    rng = random.Random(seed)
    tenants = _system_prompts(rng, 8, 700)
    arrivals: list[Arrival] = [
        (
            at,
            [
                {"role": "system", "content": rng.choice(tenants)},
                {"role": "user", "content": _words(rng, 30)},
            ],
            16,
        )
        for at in _poisson(rng, 10.0, mode.pick(20.0, 8.0))
    ]
    return _open_loop(arrivals)


def burst_workload(mode: RunMode, seed: int) -> Workload:
    """Bursts of unrelated requests, each burst as large as the fleet's batch slots."""
    rng = random.Random(seed)
    bursts = mode.pick(8, 3)
    arrivals: list[Arrival] = [
        (float(b), [{"role": "user", "content": _words(rng, 200)}], rng.randint(16, 48))
        for b in range(bursts)
        for _ in range(16)
    ]
    return _open_loop(arrivals)


def _unrelated(
    rng: random.Random, rate: float, duration: float, words: int, tokens: int
) -> list[Arrival]:
    return [
        (at, [{"role": "user", "content": _words(rng, words)}], tokens)
        for at in _poisson(rng, rate, duration)
    ]


def steady_workload(mode: RunMode, seed: int) -> Workload:
    """Poisson arrivals of unrelated requests at 24 req/s (the healthy pods cope)."""
    return _open_loop(_unrelated(random.Random(seed), 24.0, mode.pick(10.0, 4.0), 200, 32))


def light_workload(mode: RunMode, seed: int) -> Workload:
    """Poisson arrivals at 4 req/s: every pod has 0 or 1 requests in flight."""
    return _open_loop(_unrelated(random.Random(seed), 4.0, mode.pick(25.0, 10.0), 200, 24))


def moderate_workload(mode: RunMode, seed: int) -> Workload:
    """Poisson arrivals of unrelated requests at 12 req/s."""
    return _open_loop(_unrelated(random.Random(seed), 12.0, mode.pick(15.0, 6.0), 200, 32))


def mixed_length_workload(mode: RunMode, seed: int) -> Workload:
    """One request in twenty carries a long unique document (4,000 words, 0.4 s of
    prefill), the others a short question (40 words); Poisson arrivals at 12 req/s.
    The long ones are fewer than a tenth, so the p90 is a short request's: one that
    waited behind a long prefill, or not."""
    rng = random.Random(seed)
    arrivals: list[Arrival] = []
    for at in _poisson(rng, 12.0, mode.pick(15.0, 6.0)):
        words = 4000 if rng.random() < 0.05 else 40
        arrivals.append((at, [{"role": "user", "content": _words(rng, words)}], 24))
    return _open_loop(arrivals)


# -- scenarios -------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    simulator_args: tuple[str, ...]
    variants: tuple[Variant, ...]
    workload: Callable[[RunMode, int], Workload]
    target: float  # the default's p90 TTFT must be at most this x random's
    slow_factors: tuple[float, ...] = ()  # per pod, through /admin/faults (1: normal)
    slow_pod: int = -1  # the pod whose share the table shows
    # Envoy Gateway's one-filter shape (the response on the routing stream) rather than
    # envoy/envoy.yaml's routing + observer filters: with several processors Envoy picks
    # one per stream, and an observer stream on another processor than its routing
    # stream finds no session to account (extproc/handoff.py).
    single_filter: bool = False
    # Further variants judged, with their own goal (the default is always judged).
    also_judged: tuple[tuple[str, float], ...] = ()
    # The engines publish KV-cache events and the models file names the tokenizer, so the
    # processors read what the engines hold (precise mode) rather than guess it.
    kv_events: bool = False


_CHAT_ARGS = ("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "200")
_PLAIN_ARGS = ("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "100")
_TIGHT_ARGS = (*_CHAT_ARGS, "--kv-blocks", "120", "--max-num-seqs", "8")
# Precise mode: the engines render and tokenize prompts with the test tokenizer (trained in
# tests/data/make_tokenizer.py), the one the processors read from the models file.
TOKENIZER = Path(__file__).resolve().parents[1] / "tests" / "data" / "tiny-tokenizer"
_PRECISE_ARGS = ("--tokenizer", str(TOKENIZER))
# That tokenizer cuts the workload's words into about 3.8 times as many tokens as the
# simulator's own (a tenant's prompt: 2,888 tokens against 753), so the cache is that much
# larger and a token's prefill that much cheaper: each engine holds as many tenants'
# prompts, and a miss costs as long, as with _TIGHT_ARGS.
_PRECISE_TIGHT_ARGS = (
    *("--ttft-ms", "20", "--itl-ms", "10", "--prefill-us-per-token", "52"),
    *("--kv-blocks", "460", "--max-num-seqs", "8"),
)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        "chat",
        "multi-turn chat, 6 tenants' long system prompts shared across users",
        (*_CHAT_ARGS, "--kv-blocks", "320", "--max-num-seqs", "16"),
        (RANDOM, LEAST_REQUEST, PREFIX, DEFAULT),
        multi_turn_workload,
        0.5,
    ),
    Scenario(
        "tight",
        "tight caches: 8 tenants' system prompts (45 KV blocks each), each engine's cache "
        "120 blocks: two fit with room to spare, three do not",
        _TIGHT_ARGS,
        (RANDOM, LEAST_REQUEST, PREFIX, DEFAULT),
        tight_cache_workload,
        0.5,
    ),
    Scenario(
        "burst",
        "bursty uniform load: bursts of 16 unrelated requests each second, 16 batch slots",
        (*_PLAIN_ARGS, "--max-num-seqs", "4"),
        (RANDOM, LEAST_REQUEST, DEFAULT),
        burst_workload,
        NEVER_WORSE,
    ),
    Scenario(
        "slow-steady",
        "one slow pod of four (4x slower), steady 24 req/s",
        (*_PLAIN_ARGS, "--max-num-seqs", "8"),
        (RANDOM, LEAST_REQUEST, LEAST_LATENCY, DEFAULT),
        steady_workload,
        0.75,
        slow_factors=(4.0, 1.0, 1.0, 1.0),
        slow_pod=0,
    ),
    Scenario(
        "slow-light",
        "one slow pod of four (4x slower) at light load, 4 req/s",
        (*_PLAIN_ARGS, "--max-num-seqs", "8"),
        (RANDOM, LEAST_REQUEST, LEAST_LATENCY, DEFAULT),
        light_workload,
        0.7,
        slow_factors=(4.0, 1.0, 1.0, 1.0),
        slow_pod=0,
    ),
    Scenario(
        "speeds",
        "pods of different speeds (1x, 1.5x, 2.5x, 4x slower), 12 req/s",
        (*_PLAIN_ARGS, "--max-num-seqs", "8"),
        (RANDOM, LEAST_REQUEST, LEAST_LATENCY, DEFAULT),
        moderate_workload,
        NEVER_WORSE,
        slow_factors=(4.0, 2.5, 1.5, 1.0),
        slow_pod=0,
    ),
    Scenario(
        "mixed",
        "long and short prompts mixed: 1 in 20 a 4,000-word document, 12 req/s; each "
        "engine prefills one prompt at a time",
        (*_PLAIN_ARGS, "--kv-blocks", "512", "--max-num-seqs", "8", "--serial-prefill"),
        (RANDOM, LEAST_REQUEST, LEAST_KV, DEFAULT),
        mixed_length_workload,
        NEVER_WORSE,
    ),
    Scenario(
        "replicas",
        "two processor replicas side by side (same engines) against one, tight caches",
        _TIGHT_ARGS,
        (RANDOM, DEFAULT, TWO_PROCESSORS, TWO_PROCESSORS_REDIS),
        tight_cache_workload,
        0.5,
        single_filter=True,
        also_judged=((TWO_PROCESSORS.label, NEVER_WORSE), (TWO_PROCESSORS_REDIS.label, 0.5)),
    ),
    Scenario(
        "replicas-precise",
        "two processor replicas side by side (same engines) against one, tight caches, "
        "engines publishing KV-cache events (precise mode)",
        _PRECISE_TIGHT_ARGS,
        (RANDOM, DEFAULT, TWO_PROCESSORS, PRECISE, PRECISE_TWO),
        tight_cache_workload,
        0.5,
        single_filter=True,
        also_judged=((TWO_PROCESSORS.label, 0.5), (PRECISE_TWO.label, 0.5)),
        kv_events=True,
    ),
)  # fmt: skip


# -- the fleet -------------------------------------------------------------------------


@dataclass
class Fleet:
    group: ProcessGroup
    front_port: int
    processor_admins: list[int]
    simulator_ports: list[int]


def start_fleet(
    log_dir: Path,
    simulator_args: tuple[str, ...],
    processors: int,
    seed: int,
    single_filter: bool = False,
    kv_events: bool = False,
    redis: bool = False,
) -> Fleet:
    """Four engines, `processors` processors and the front Envoy (its processor cluster
    listing every processor), all freshly started. With `kv_events` the engines publish
    KV-cache events and every processor subscribes to them; with `redis` the processors
    share a redis-server of their own (--redis-url)."""
    group = ProcessGroup()
    env = localstack.environment_without_gateway_settings()
    try:
        shared: tuple[str, ...] = ()
        if redis:
            shared = ("--redis-url", start_redis(group, log_dir))
        ports = _distinct_ports(2 * PODS if kv_events else PODS)
        event_ports = ports[PODS:]
        ports = ports[:PODS]
        for i, port in enumerate(ports):
            events = (*_PRECISE_ARGS, "--kv-events-port", str(event_ports[i])) if kv_events else ()
            group.add(
                localstack.start_simulator(
                    port,
                    [MODEL],
                    log_dir,
                    extra_args=[*simulator_args, *events, "--seed", str(i)],
                    env=env,
                )
            )
        if kv_events:
            models = write_precise_models_file(log_dir / "models.yaml", ports, event_ports)
        else:
            models = write_models_file(
                log_dir / "models.yaml",
                {MODEL: [(f"pod-{i}", f"{LOCALHOST}:{port}") for i, port in enumerate(ports)]},
            )
        grpc_ports = [localstack.free_port() for _ in range(processors)]
        admins = [localstack.free_port() for _ in range(processors)]
        for i, (grpc_port, admin) in enumerate(zip(grpc_ports, admins, strict=True)):
            group.add(
                localstack.start_processor(
                    models,
                    log_dir,
                    grpc_port=grpc_port,
                    admin_port=admin,
                    # A seed per workload seed: the same run routes the same way when
                    # repeated, and different seeds see different draws.
                    extra_args=[
                        *("--log-format", "json", "--log-level", "info"),
                        *("--routing-seed", str(seed * 10 + i)),
                        *shared,
                    ],
                    env=env,
                    name=f"processor-{i}",
                )
            )
        localstack.wait_ready(group, timeout=60)
        front_port, front_admin = localstack.free_port(), localstack.free_port()
        bootstrap = yaml.safe_load(
            localstack.render_envoy_config(
                localstack.repo_file(localstack.ENVOY_CONFIG),
                listen_port=front_port,
                admin_port=front_admin,
                extproc_port=grpc_ports[0],
            )
        )
        add_processor_endpoints(bootstrap, grpc_ports[1:])
        if single_filter:
            localstack.single_filter_shape(bootstrap)
        front = group.add(start_front_envoy(log_dir, bootstrap, front_admin))
        localstack.wait_ready([front], timeout=60)
        for admin in admins:
            wait_for_first_scrapes(admin, PODS)
            if kv_events:
                wait_for_event_streams(admin, PODS)
    except BaseException:
        group.stop()
        raise
    return Fleet(group, front_port, admins, ports)


def start_redis(group: ProcessGroup, log_dir: Path, timeout: float = 10.0) -> str:
    """A redis-server on a free loopback port, in `group`; its URL once it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = localstack.free_port()
    data = log_dir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", LOCALHOST, "--save", "", "--appendonly", "no",
            "--dir", str(data)]  # fmt: skip
    process = group.add(localstack.spawn(f"redis-{port}", argv, log_dir))
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((LOCALHOST, port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return f"redis://{LOCALHOST}:{port}/0"
        except OSError:
            pass
        if not process.alive() or time.monotonic() > deadline:
            raise localstack.StartupError(f"redis-server did not start:\n{process.log_tail()}")
        time.sleep(0.05)


def _distinct_ports(count: int) -> list[int]:
    """`count` free ports, no two alike (the OS may hand a just-closed one out again)."""
    ports: list[int] = []
    for _ in range(100 * count):
        port = localstack.free_port()
        if port not in ports:
            ports.append(port)
        if len(ports) == count:
            return ports
    raise RuntimeError(f"could not find {count} distinct free ports")


def write_precise_models_file(path: Path, ports: list[int], event_ports: list[int]) -> Path:
    """The models file of a precise fleet: the model's tokenizer (the one the engines
    render and tokenize with) and each pod's KV-event endpoint."""
    pods = [
        {
            "name": f"pod-{i}",
            "address": f"{LOCALHOST}:{port}",
            "kv_events": f"tcp://{LOCALHOST}:{events}",
        }
        for i, (port, events) in enumerate(zip(ports, event_ports, strict=True))
    ]
    doc = {"models": [{"name": MODEL, "tokenizer": str(TOKENIZER), "pods": pods}]}
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def wait_for_event_streams(admin_port: int, pods: int, timeout: float = 30.0) -> None:
    """Until the processor is subscribed to every engine's KV events (each pod trusted),
    so precise routing does not start on the approximate fallback."""
    deadline = time.monotonic() + timeout
    url = f"http://{LOCALHOST}:{admin_port}/debug/kv-events"
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=2) as r:
            streams = json.loads(r.read())["pods"]
        if sum(1 for stream in streams.values() if stream["trusted"]) >= pods:
            return
        time.sleep(0.1)
    raise RuntimeError("the processor did not subscribe to every engine's KV events in time")


def wait_for_first_scrapes(admin_port: int, pods: int, timeout: float = 30.0) -> None:
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


# -- running ---------------------------------------------------------------------------


async def _drive(port: int, stats: RunStats, workload: Workload, limit_s: float) -> None:
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        client = Client(session, port, stats)
        started = time.perf_counter()
        async with asyncio.timeout(limit_s):
            await workload(client)
        stats.wall_s = time.perf_counter() - started


def _start_fleet_retrying(scenario: Scenario, variant: Variant, seed: int, log_dir: Path) -> Fleet:
    """start_fleet, once more on a start-up failure: a free port found for a process can
    be taken by another program on a shared machine before the process binds it."""
    for attempt in range(2):
        try:
            return start_fleet(
                log_dir,
                scenario.simulator_args,
                variant.processors,
                seed,
                scenario.single_filter,
                scenario.kv_events,
                variant.redis,
            )
        except localstack.StartupError as exc:
            if attempt:
                raise
            print(f"   fleet did not start ({exc}); once more", flush=True)
    raise AssertionError("unreachable")


def run_variant(
    scenario: Scenario, variant: Variant, seed: int, mode: RunMode, log_dir: Path
) -> dict[str, Any]:
    fleet = _start_fleet_retrying(scenario, variant, seed, log_dir)
    stats = RunStats(variant, seed)
    stats.pods = [f"{LOCALHOST}:{port}" for port in fleet.simulator_ports]
    try:
        for port, factor in zip(fleet.simulator_ports, scenario.slow_factors, strict=False):
            if factor != 1.0:
                set_slow(port, factor)
        if scenario.slow_pod >= 0:
            stats.slow_pod = f"{LOCALHOST}:{fleet.simulator_ports[scenario.slow_pod]}"
        workload = scenario.workload(mode, seed)
        uvloop.run(_drive(fleet.front_port, stats, workload, mode.pick(120.0, 60.0)))
        stats.hit_rate = prefix_hit_rate(fleet.simulator_ports)
    finally:
        fleet.group.stop()
    return stats.summary()


def run_scenario(
    scenario: Scenario, mode: RunMode, seeds: Sequence[int], variants: Sequence[Variant] = ()
) -> list[dict[str, Any]]:
    """Every variant on every seed, interleaved: seed by seed, all variants in turn."""
    out = []
    for seed in seeds:
        for index, variant in enumerate(variants or scenario.variants):
            log_dir = mode.work_dir / NAME / f"{scenario.key}-s{seed}-{index}"
            summary = run_variant(scenario, variant, seed, mode, log_dir)
            out.append(summary)
            print(
                f"   {scenario.key} seed {seed} {variant.label}: "
                f"p50 {summary['ttft_p50_ms']:.0f} p90 {summary['ttft_p90_ms']:.0f} ms, "
                f"hits {summary['prefix_hit_rate'] * 100:.0f}%, errors {summary['errors']}",
                flush=True,
            )
    return out


# -- the report ------------------------------------------------------------------------


def _ratio(run: dict[str, Any], runs: list[dict[str, Any]], key: str = "ttft_p90_ms") -> float:
    base = next(r for r in runs if r["seed"] == run["seed"] and r["strategy"] == "random")
    return float(run[key] / base[key])


def _ratios(label: str, runs: list[dict[str, Any]], seeds: Sequence[int]) -> list[float]:
    return [_ratio(r, runs) for r in runs if r["variant"] == label and r["seed"] in seeds]


def _rows(scenario: Scenario, runs: list[dict[str, Any]], seeds: Sequence[int]) -> list[list[str]]:
    rows = []
    for variant in scenario.variants:
        mine = [r for r in runs if r["variant"] == variant.label and r["seed"] in seeds]
        if not mine:
            continue
        errors = sum(r["errors"] for r in mine)
        row = [
            f"`{variant.label}`",
            str(sum(r["requests"] for r in mine)) + (f" ({errors} errors)" if errors else ""),
            " / ".join(fmt(r["ttft_p50_ms"], 0) for r in mine),
            " / ".join(fmt(r["ttft_p90_ms"], 0) for r in mine),
            " / ".join(f"{_ratio(r, runs, 'ttft_p50_ms'):.2f}" for r in mine),
            " / ".join(f"{_ratio(r, runs):.2f}" for r in mine),
            " / ".join(f"{r['prefix_hit_rate'] * 100:.0f}%" for r in mine),
        ]
        if scenario.slow_pod >= 0:
            row.append(" / ".join(f"{r['slow_pod_share'] * 100:.0f}%" for r in mine))
        rows.append(row)
    return rows


def _verdicts(scenario: Scenario, runs: list[dict[str, Any]], seeds: Sequence[int]) -> list[Target]:
    out = []
    for label, goal in ((DEFAULT.label, scenario.target), *scenario.also_judged):
        worst = max(_ratios(label, runs, seeds), default=float("nan"))
        out.append(
            Target(
                f"quality ({scenario.key}): `{label}` p90 TTFT vs random, held-out seeds",
                f"<= {goal:.2f}x random" if goal < NEVER_WORSE else "never above random",
                f"worst {worst:.2f}x",
                worst <= goal,
            )
        )
    if scenario.key.startswith("replicas"):
        out += _replica_hit_verdicts(scenario, runs, seeds)
    return out


# Two processors keep one's fleet prefix hit rate when theirs is at most this much lower
# (percentage points; the rate moves by a few points from run to run of one seed).
HIT_RATE_SLACK = 0.05


def _replica_hit_verdicts(
    scenario: Scenario, runs: list[dict[str, Any]], seeds: Sequence[int]
) -> list[Target]:
    """Per profile: do two processors that share what they know (the engines' KV-cache
    events, or their placements through Redis) keep the fleet prefix hit rate one
    processor reaches (worst held-out seed)? Two processors on the approximate path
    without Redis are judged against random only: they do not share."""
    out = []
    pairs = [(DEFAULT, TWO_PROCESSORS_REDIS), (PRECISE, PRECISE_TWO)]
    if scenario.kv_events:
        pairs.append((DEFAULT, TWO_PROCESSORS))
    for one, two in (p for p in pairs if {p[0], p[1]} <= set(scenario.variants)):
        gaps = []
        for seed in seeds:
            hits = {
                r["variant"]: r["prefix_hit_rate"]
                for r in runs
                if r["seed"] == seed and r["variant"] in (one.label, two.label)
            }
            if len(hits) == 2:
                gaps.append(hits[one.label] - hits[two.label])
        worst = max(gaps, default=float("nan"))
        out.append(
            Target(
                f"quality ({scenario.key}): `{two.label}` fleet prefix hit rate vs one "
                "processor's, held-out seeds",
                f"at most {HIT_RATE_SLACK * 100:.0f} points lower",
                f"worst {worst * 100:+.0f} points",
                worst <= HIT_RATE_SLACK,
            )
        )
    return out


def _header(scenario: Scenario) -> list[str]:
    header = [
        "variant",
        "requests",
        "TTFT p50 ms",
        "TTFT p90 ms",
        "p50 vs random",
        "p90 vs random",
        "fleet prefix hit rate",
    ]
    if scenario.slow_pod >= 0:
        header.append("slowest pod's share")
    return header


def run(mode: RunMode) -> Section:
    return run_seeds(mode, TUNING_SEEDS[: mode.pick(2, 1)], HELD_OUT_SEEDS[: mode.pick(2, 1)])


def run_seeds(
    mode: RunMode, tuning: Sequence[int], held_out: Sequence[int], *, core: bool = False
) -> Section:
    """Every workload on these seeds. `core`: only `random` and the default on each
    workload, plus every variant of the replicas workloads (a shorter run)."""
    data: dict[str, Any] = {"tuning_seeds": list(tuning), "held_out_seeds": list(held_out)}
    for scenario in SCENARIOS:
        variants = core_variants(scenario) if core else scenario.variants
        data[scenario.key] = {
            "title": scenario.title,
            "args": scenario.simulator_args,
            "slow_factors": scenario.slow_factors,
            "runs": run_scenario(scenario, mode, [*tuning, *held_out], variants),
        }
    return section_from(data)


def core_variants(scenario: Scenario) -> tuple[Variant, ...]:
    if scenario.key.startswith("replicas"):
        return scenario.variants
    return tuple(v for v in scenario.variants if v in (RANDOM, DEFAULT))


def section_from(data: dict[str, Any]) -> Section:
    """The report's section from what `run` measured (also to re-render stored data)."""
    tuning, held_out = data["tuning_seeds"], data["held_out_seeds"]
    parts = []
    targets: list[Target] = []
    for scenario in SCENARIOS:
        if scenario.key not in data:
            continue
        runs = data[scenario.key]["runs"]
        slow = f" Slow factors per pod: {scenario.slow_factors}." if scenario.slow_factors else ""
        parts.append(
            f"**({scenario.key}) {scenario.title}.** Simulators: "
            f"`{' '.join(scenario.simulator_args)}`.{slow}"
        )
        for name, seeds in (("tuning", tuning), ("held-out", held_out)):
            parts.append(f"Seeds {', '.join(map(str, seeds))} ({name}), one figure per seed:")
            parts.append(table(_header(scenario), _rows(scenario, runs, seeds)))
        targets += _verdicts(scenario, runs, held_out)
    section = Section(NAME, TITLE, data=data, targets=targets)
    section.body = "\n\n".join(
        [
            "Four `gateway-extproc simulate` processes behind the real front Envoy and "
            "processor (see the module docstring of bench/quality.py for why this path "
            "rather than in-process routing). Every variant gets the same seeded workload "
            "and a fresh set of processes; the variants of a workload run interleaved, "
            "seed by seed, and ratios compare each run with `random` on the same seed "
            "(tuning seeds: looked at while the default profile was tuned; held-out "
            "seeds: not). TTFT is measured by the client, from sending the request to "
            "the first streamed token; the fleet prefix hit rate is the engines' own "
            "(prefix-cache hits / queried prompt tokens, four engines summed). "
            "`default (no header)` is what a user who sets nothing gets "
            "(`predicted-latency`).",
            _failures(data),
            *parts,
            "Verdicts (held-out seeds): "
            + "; ".join(f"{t.name} {t.goal}: {t.figure}, {met_mark(t.met)}" for t in targets),
        ]
    )
    return section


def _failures(data: dict[str, Any]) -> str:
    """The failures the issue reported, as this run measured them (every seed)."""
    if not any(r["variant"] == PREFIX.label for r in data.get("tight", {}).get("runs", [])):
        return "This run measured `random` and the default only (plus the replicas variants)."

    def ratios(key: str, label: str) -> str:
        runs = data.get(key, {}).get("runs", [])
        return ", ".join(f"{_ratio(r, runs):.2f}" for r in runs if r["variant"] == label)

    def hits(key: str, label: str) -> str:
        runs = data.get(key, {}).get("runs", [])
        return ", ".join(
            f"{r['prefix_hit_rate'] * 100:.0f}%" for r in runs if r["variant"] == label
        )

    return (
        "What today's strategies do in the regimes the issue reported (p90 TTFT over "
        "random's, every seed in order): on tight caches `prefix-cache` "
        f"{ratios('tight', PREFIX.label)} while `least-request` (no prefix awareness, a "
        f"miss on nearly every request) {ratios('tight', LEAST_REQUEST.label)}; with one "
        f"slow pod at light load `least-request` {ratios('slow-light', LEAST_REQUEST.label)}. "
        "Two processors side by side (approximate mode, each learning from its own half "
        f"of the traffic): fleet hit rate {hits('replicas', DEFAULT.label)} with one, "
        f"{hits('replicas', TWO_PROCESSORS.label)} with two."
    )


# -- replicas against one, on their own ------------------------------------------------


def compare_replicas(seeds: Sequence[int] = (*TUNING_SEEDS, *HELD_OUT_SEEDS)) -> list[str]:
    """The replicas regime alone, one processor, two, and two sharing prefix placements
    through a redis-server (--redis-url), interleaved seed by seed: the issue's goal is
    two within 10% of one on p90 TTFT. Prints and returns a line per seed.
    `.venv/bin/python -c "from bench.quality import compare_replicas as c; c()"`
    """
    scenario = next(s for s in SCENARIOS if s.key == "replicas")
    variants = (DEFAULT, TWO_PROCESSORS, TWO_PROCESSORS_REDIS)
    runs = run_scenario(scenario, RunMode(), seeds, variants)
    lines = []
    for seed in seeds:
        one, two, shared = (
            next(r for r in runs if r["seed"] == seed and r["variant"] == v.label) for v in variants
        )
        lines.append(
            f"seed {seed}: p90 one {one['ttft_p90_ms']:.0f} ms, two {two['ttft_p90_ms']:.0f} ms "
            f"({two['ttft_p90_ms'] / one['ttft_p90_ms']:.2f}x), two with Redis "
            f"{shared['ttft_p90_ms']:.0f} ms ({shared['ttft_p90_ms'] / one['ttft_p90_ms']:.2f}x); "
            f"fleet hit rate {one['prefix_hit_rate'] * 100:.0f}% / "
            f"{two['prefix_hit_rate'] * 100:.0f}% / {shared['prefix_hit_rate'] * 100:.0f}%"
        )
        print(lines[-1], flush=True)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m bench.quality --tuning 1 --held-out 5,6 [--core] [--quick]`: this
    benchmark on chosen seeds, its section of docs/BENCHMARKS.md rewritten."""
    import argparse
    import sys

    from bench import notes, report
    from bench.__main__ import BENCHMARKS, provenance
    from bench.common import cpu_jiffies, machine, utc_now

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m bench.quality")
    parser.add_argument("--tuning", default="1,2", help="tuning seeds, comma-separated")
    parser.add_argument("--held-out", default="3,4", help="held-out seeds, comma-separated")
    parser.add_argument("--core", action="store_true", help="random and the default only")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=Path("docs/BENCHMARKS.md"))
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/gateway-extproc-bench"))
    args = parser.parse_args(argv)
    mode = RunMode(quick=args.quick, work_dir=args.work_dir)
    started_at, load = utc_now(), machine()["load_avg"]
    steal0, total0 = cpu_jiffies()
    started = time.monotonic()
    section = run_seeds(
        mode,
        [int(s) for s in args.tuning.split(",") if s],
        [int(s) for s in args.held_out.split(",") if s],
        core=args.core,
    )
    steal1, total1 = cpu_jiffies()
    steal = (steal1 - steal0) / max(1, total1 - total0)
    line = provenance(argv, mode, started_at, load, time.monotonic() - started, steal)
    line = line.replace(" -m bench ", " -m bench.quality ", 1)
    report.write(args.output, {NAME: (section, line)}, list(BENCHMARKS), notes.NOTES)
    for target in section.targets:
        print(f"   {target.name} {target.goal}: {target.figure} -> {target.met}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
