"""MetricsScraper against real HTTP servers on ephemeral ports: success, HTTP 500,
garbage, refused and hung endpoints, cold start and pod deletion."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from gateway_extproc.metrics import MetricsScraper, MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod
from tests.waiting import eventually


class Engine:
    """A /metrics endpoint whose behaviour a test switches between ok, 500, garbage, hang."""

    def __init__(self) -> None:
        self.mode = "ok"
        self.waiting = 3
        self.tokens = 0
        self.hits = 0
        self.release = asyncio.Event()

    async def metrics(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.mode == "500":
            return web.Response(status=500, text="internal error")
        if self.mode == "garbage":
            return web.Response(text="<html>definitely not prometheus</html>")
        if self.mode == "hang":
            await self.release.wait()
        self.tokens += 100
        text = (
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {self.waiting}\n'
            'vllm:num_requests_running{engine="0",model_name="m"} 2\n'
            'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.4\n'
            f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {self.tokens}\n'
            'vllm:generation_tokens_total{engine="0",model_name="m"} 0\n'
        )
        return web.Response(text=text, content_type="text/plain")


Serve = Callable[[Engine], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    runners: list[web.AppRunner] = []
    engines: list[Engine] = []

    async def start(engine: Engine) -> str:
        app = web.Application()
        app.router.add_get("/metrics", engine.metrics)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        engines.append(engine)
        host, port = runner.addresses[0][:2]
        return f"{host}:{port}"

    yield start
    for engine in engines:
        engine.release.set()
    for runner in runners:
        await runner.cleanup()


def free_port_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def pod(name: str, address: str, *, ready: bool = True) -> Pod:
    return Pod(name=name, namespace="scrape", address=address, models=("m",), ready=ready)


def failures(key: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "gateway_metrics_scrape_failures_total", {"pod": key, "reason": reason}
    )
    return value or 0.0


def coldstarts() -> float:
    return REGISTRY.get_sample_value("pod_coldstart_duration_seconds_count") or 0.0


async def until(check: Callable[[], object], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


async def test_scrapes_routable_pods_into_the_store(serve: Serve) -> None:
    engine = Engine()
    address = await serve(engine)
    registry = ModelRegistry()
    registry.upsert_pod(pod("ok", address))
    registry.upsert_pod(pod("not-ready", free_port_address(), ready=False))
    store = MetricsStore()
    scraper = MetricsScraper(registry, store, interval=0.02, timeout=0.5)
    await scraper.start()
    try:
        await until(lambda: (m := store.get("scrape/ok")) and m.tokens_per_second)
    finally:
        await scraper.stop()
    m = store.get("scrape/ok")
    assert m is not None
    assert (m.waiting, m.running, m.kv_cache_usage) == (3, 2, 0.4)
    assert m.tokens_per_second is not None and m.tokens_per_second > 0
    assert store.get("scrape/not-ready") is None  # never scraped: not routable
    assert store.first_routable_at("scrape/not-ready") is None


async def test_cold_start_is_observed_once_per_pod(serve: Serve) -> None:
    engine = Engine()
    address = await serve(engine)
    registry = ModelRegistry()
    registry.upsert_pod(pod("cold", address))
    store = MetricsStore()
    scraper = MetricsScraper(registry, store, interval=0.02)
    before = coldstarts()
    await scraper.start()
    try:
        await until(lambda: engine.hits >= 5)
    finally:
        await scraper.stop()
    assert coldstarts() == before + 1
    assert store.first_routable_at("scrape/cold") is not None


@pytest.mark.parametrize(("mode", "reason"), [("500", "http_5xx"), ("garbage", "parse")])
async def test_failed_scrape_keeps_last_good_until_stale(
    serve: Serve, mode: str, reason: str
) -> None:
    engine = Engine()
    address = await serve(engine)
    registry = ModelRegistry()
    registry.upsert_pod(pod(f"flaky-{mode}", address))
    key = f"scrape/flaky-{mode}"
    store = MetricsStore(staleness=0.4)
    scraper = MetricsScraper(registry, store, interval=0.02)
    await scraper.start()
    try:
        await until(lambda: store.get(key) is not None)
        good = store.get(key)
        base = failures(key, reason)
        engine.mode = mode
        engine.waiting = 99  # would show up if a failed scrape overwrote anything
        await until(lambda: failures(key, reason) >= base + 2)
        assert store.get(key) is good  # last good values still served
        await until(lambda: store.get(key) is None, timeout=2.0)  # ... until stale
        assert store.latest(key) is good
        engine.mode = "ok"
        await until(lambda: (m := store.get(key)) is not None and m.waiting == 99)
    finally:
        await scraper.stop()
    assert store.failures(key)[reason] >= 2


async def test_refused_connection_is_counted(serve: Serve) -> None:
    registry = ModelRegistry()
    registry.upsert_pod(pod("refused", free_port_address()))
    store = MetricsStore()
    scraper = MetricsScraper(registry, store, interval=0.02)
    base = failures("scrape/refused", "connect")
    await scraper.start()
    try:
        await until(lambda: failures("scrape/refused", "connect") >= base + 2)
    finally:
        await scraper.stop()
    assert store.get("scrape/refused") is None


async def test_hung_pod_times_out_without_slowing_the_others(serve: Serve) -> None:
    hung, healthy = Engine(), Engine()
    hung_address = await serve(hung)
    registry = ModelRegistry()
    registry.upsert_pod(pod("hung", hung_address))
    registry.upsert_pod(pod("healthy", await serve(healthy)))
    store = MetricsStore(staleness=0.5)
    scraper = MetricsScraper(registry, store, interval=0.02, timeout=0.3)
    await scraper.start()
    try:
        await until(lambda: store.get("scrape/hung") is not None)
        good = store.get("scrape/hung")
        base = failures("scrape/hung", "timeout")
        hung.mode = "hang"
        started = healthy.hits
        await until(lambda: failures("scrape/hung", "timeout") >= base + 1, timeout=2.0)
        # While the hung pod held its scrape for 0.3 s, the healthy one kept its cadence.
        assert healthy.hits - started >= 5
        assert store.get("scrape/healthy") is not None
        assert store.latest("scrape/hung") is good
        await until(lambda: store.get("scrape/hung") is None, timeout=2.0)
    finally:
        await scraper.stop()


async def test_a_hung_pod_is_reported_unreachable_and_an_erring_one_is_not(
    serve: Serve,
) -> None:
    # A stopped engine accepts the connection and never answers: passive health must
    # hear of it from the scrapes, as it hears of a refused connection.
    hung, erring = Engine(), Engine()
    registry = ModelRegistry()
    registry.upsert_pod(pod("hung", await serve(hung)))
    registry.upsert_pod(pod("erring", await serve(erring)))
    reported: list[tuple[str, str]] = []
    scraper = MetricsScraper(
        registry,
        MetricsStore(),
        interval=0.02,
        timeout=0.2,
        on_unreachable=lambda p, reason: reported.append((p.key, reason)),
    )
    hung.mode, erring.mode = "hang", "500"
    await scraper.start()
    try:
        await until(lambda: ("scrape/hung", "timeout") in reported)
        await until(lambda: failures("scrape/erring", "http_5xx") >= 1)
    finally:
        await scraper.stop()
    assert {key for key, _ in reported} == {"scrape/hung"}


async def test_deleting_a_pod_drops_its_metrics_and_series(serve: Serve) -> None:
    engine = Engine()
    address = await serve(engine)
    registry = ModelRegistry()
    registry.upsert_pod(pod("doomed", address))
    store = MetricsStore()
    scraper = MetricsScraper(registry, store, interval=0.02)
    await scraper.start()
    try:
        await until(lambda: store.get("scrape/doomed") is not None)
        engine.mode = "500"
        await until(lambda: failures("scrape/doomed", "http_5xx") >= 1)
        registry.delete_pod("scrape/doomed")
        hits = engine.hits
        await asyncio.sleep(0.1)
    finally:
        await scraper.stop()
    assert engine.hits <= hits + 1  # at most one scrape already under way
    assert store.latest("scrape/doomed") is None
    assert store.first_routable_at("scrape/doomed") is None
    assert (
        REGISTRY.get_sample_value(
            "gateway_metrics_scrape_failures_total", {"pod": "scrape/doomed", "reason": "http_5xx"}
        )
        is None
    )


async def test_scrape_once_and_stop_are_clean(serve: Serve) -> None:
    engine = Engine()
    registry = ModelRegistry()
    registry.upsert_pod(pod("once", await serve(engine)))
    store = MetricsStore()
    scraper = MetricsScraper(registry, store, interval=60.0)
    await scraper.start()
    await scraper.scrape_once()
    assert store.get("scrape/once") is not None
    await scraper.stop()
    await scraper.stop()  # idempotent


async def test_large_fleets_stretch_the_round_instead_of_flooding_the_loop(
    serve: Serve,
) -> None:
    engine = Engine()
    address = await serve(engine)
    registry = ModelRegistry()
    registry.replace_all(pod(f"many-{i}", address) for i in range(10))
    store = MetricsStore()
    # 10 pods every 10 ms would be 1,000 scrapes/s; the budget of 50/s makes it 0.2 s.
    scraper = MetricsScraper(registry, store, interval=0.01, max_scrapes_per_second=50)
    started = time.monotonic()
    await scraper.start()
    try:
        # Every pod is still scraped: the round stretches, it does not skip pods.
        await eventually(
            lambda: all(store.get(f"scrape/many-{i}") is not None for i in range(10)),
            what="every pod scraped",
        )
        await eventually(lambda: engine.hits >= 20, what="a second round")
    finally:
        await scraper.stop()
    elapsed = time.monotonic() - started
    # Unpaced, that would be 1,000 scrapes/s. A slow machine only lowers the rate, so the
    # bound (the budget, plus one round's worth of slack) cannot fail for lack of speed.
    assert engine.hits <= 50 * elapsed + 10
