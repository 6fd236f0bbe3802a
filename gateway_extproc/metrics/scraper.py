"""MetricsScraper: the background task that keeps the MetricsStore current.

Every `interval` (stretched so that the scraper never exceeds `max_scrapes_per_second`
on large fleets) it looks at the registry, notes newly routable pods (the cold-start clock
starts there) and starts one scrape per routable pod that is not still being scraped, all
through one aiohttp session and at most `concurrency` at a time. Each pod has its own
deadline (`timeout`), so a hung pod delays only itself and never a request: requests read
the store, never the network. A failed scrape is counted and leaves the last good values
in place until they go stale.

A round is complete once every scrape it started, and every scrape still running when it
began, has ended; the store is told (`MetricsStore.round_completed`) so that metrics from
the latest completed round stay in use when a round takes longer than the staleness
(large fleets). The round's length is the gauge `gateway_metrics_round_seconds`, and a
round longer than the staleness is warned about at most once a minute.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from functools import partial

import aiohttp
import structlog
from yarl import URL

from gateway_extproc import telemetry
from gateway_extproc.metrics.parser import MetricsParseError, parse_engine_metrics
from gateway_extproc.metrics.store import ROUND_LIMIT, MetricsStore
from gateway_extproc.models.registry import ModelRegistry, Pod

log = structlog.get_logger("gateway_extproc.metrics")

# A failing pod is warned about at most this often; every failure is still counted.
WARN_EVERY_SECONDS = 60.0
# An engine's /metrics is tens of kilobytes; anything far larger is not what we want.
MAX_BODY_BYTES = 8 * 1024 * 1024


class _ScrapeFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Round:
    """A round not yet complete: when it began (store clock) and how many of the scrapes
    it started are still running."""

    __slots__ = ("pending", "started")

    def __init__(self, started: float, pending: int) -> None:
        self.started = started
        self.pending = pending


class MetricsScraper:
    def __init__(
        self,
        registry: ModelRegistry,
        store: MetricsStore,
        *,
        interval: float = 0.2,
        timeout: float = 1.0,
        concurrency: int = 64,
        max_scrapes_per_second: float = 1000.0,
        path: str = "/metrics",
        on_unreachable: Callable[[Pod, str], None] | None = None,
    ) -> None:
        if min(interval, timeout, concurrency, max_scrapes_per_second) <= 0:
            raise ValueError(
                "interval, timeout, concurrency and max_scrapes_per_second must be positive"
            )
        self.registry = registry
        self.store = store
        self.interval = interval
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_scrapes_per_second = max_scrapes_per_second
        self._stretched = False
        self._period_now = interval  # the round period last computed
        # Rounds not complete yet, oldest first, by number. A round completes when its
        # own scrapes and those of every older round have ended: the older ones are the
        # scrapes still running when it began, which it skipped those pods for.
        self._rounds: dict[int, _Round] = {}
        self._round_number = 0
        self._routable = 0
        self._slow_warned_at: float | None = None
        self.path = path
        # Told of every scrape that could not connect (passive health counts them).
        self._on_unreachable = on_unreachable
        self._session: aiohttp.ClientSession | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._scrapes: dict[str, asyncio.Task[None]] = {}
        self._semaphore = asyncio.Semaphore(concurrency)
        self._urls: dict[str, tuple[str, URL]] = {}
        self._warned_at: dict[str, float] = {}
        registry.on_pod_removed(self._forget)

    async def start(self) -> None:
        if self._loop_task is not None:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self.concurrency, ttl_dns_cache=300),
            # Each scrape has its own deadline (asyncio.timeout); none at session level.
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=True,
        )
        self._loop_task = asyncio.create_task(self._run(), name="metrics-scraper")
        log.info(
            "metrics_scraper_started",
            interval=self.interval,
            timeout=self.timeout,
            concurrency=self.concurrency,
        )

    async def stop(self) -> None:
        task, self._loop_task = self._loop_task, None
        if task is not None:
            task.cancel()
        self._rounds.clear()  # cancelled scrapes complete no round
        scrapes = list(self._scrapes.values())
        for scrape in scrapes:
            scrape.cancel()
        await asyncio.gather(
            *(t for t in (task, *scrapes) if t is not None), return_exceptions=True
        )
        self._scrapes.clear()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    async def scrape_once(self) -> None:
        """Start a round now and wait until every scrape in it has ended (tests, replay)."""
        self._round()
        if self._scrapes:
            await asyncio.gather(*self._scrapes.values(), return_exceptions=True)

    # -- the loop -----------------------------------------------------------------------

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            pods = 0
            try:
                pods = self._round()
            except Exception:  # a bug here must not end scraping for good
                log.exception("metrics_scrape_round_failed")
            period = self._period(pods)
            await asyncio.sleep(max(0.0, period - (loop.time() - started)))

    def _period(self, pods: int) -> float:
        """The round period: `interval`, stretched when that many pods at that interval
        would exceed `max_scrapes_per_second` (each scrape costs the event loop about
        0.2 ms of CPU, which requests share)."""
        period = max(self.interval, pods / self.max_scrapes_per_second)
        self._period_now = period
        stretched = period > self.interval
        if stretched != self._stretched:
            self._stretched = stretched
            log.warning(
                "metrics_scrape_interval_stretched"
                if stretched
                else "metrics_scrape_interval_restored",
                pods=pods,
                interval=self.interval,
                period=period,
                max_scrapes_per_second=self.max_scrapes_per_second,
                staleness=self.store.staleness,
            )
        return period

    def _round(self) -> int:
        """Start a scrape for each routable pod not still being scraped; returns how many
        pods are routable."""
        if self._session is None:
            raise RuntimeError("MetricsScraper.start() was not called")
        store = self.store
        self._round_number += 1
        number = self._round_number
        this = self._rounds[number] = _Round(store.clock(), 0)
        done = partial(self._done, number)
        routable = 0
        for pod in self.registry.pods():
            if not pod.routable:
                continue
            routable += 1
            key = pod.key
            store.mark_routable(key)
            busy = self._scrapes.get(key)
            # Still busy with an earlier round: skip, do not pile up. (A scrape that has
            # ended but whose done callback has not run yet is not busy: skipping its pod
            # would leave it out of this round.)
            if busy is not None and not busy.done():
                continue
            task = asyncio.create_task(self._scrape(pod))
            self._scrapes[key] = task
            this.pending += 1
            task.add_done_callback(partial(done, key))
        self._routable = routable
        self._close_rounds()
        return routable

    def _done(self, number: int, key: str, task: asyncio.Task[None]) -> None:
        if self._scrapes.get(key) is task:
            del self._scrapes[key]
        begun = self._rounds.get(number)
        if begun is not None:
            begun.pending -= 1
            if begun.pending <= 0:
                self._close_rounds()

    def _close_rounds(self) -> None:
        """Report the rounds now complete: from the oldest, those with nothing running."""
        rounds = self._rounds
        while rounds:
            number = next(iter(rounds))
            oldest = rounds[number]
            if oldest.pending > 0:
                return
            del rounds[number]
            self._round_completed(oldest.started)

    def _round_completed(self, started: float) -> None:
        store = self.store
        # The round's length: as scheduled, or longer when its scrapes took longer.
        took = store.clock() - started
        seconds = max(self._period_now, took)
        store.round_completed(started, seconds)
        telemetry.METRICS_ROUND.set(seconds)
        staleness = store.staleness
        # Warn when the fleet cannot be scraped within the staleness, not when the
        # interval was simply set longer than it.
        if took > staleness:
            now = time.monotonic()
            last = self._slow_warned_at
            if last is None or now - last >= WARN_EVERY_SECONDS:
                self._slow_warned_at = now
                log.warning(
                    "metrics_scrape_round_slow",
                    round_seconds=round(seconds, 3),
                    staleness=staleness,
                    pods=self._routable,
                    detail="metrics stay in use until the next round completes (at most "
                    f"{ROUND_LIMIT} rounds), not only for --metrics-staleness",
                )
        elif self._slow_warned_at is not None:
            self._slow_warned_at = None
            log.info("metrics_scrape_round_fits", round_seconds=round(seconds, 3))

    # -- one pod ------------------------------------------------------------------------

    async def _scrape(self, pod: Pod) -> None:
        key = pod.key
        async with self._semaphore:
            started = time.perf_counter()
            try:
                text = await self._fetch(pod)
                sample = parse_engine_metrics(text)
            except _ScrapeFailed as failed:
                self._failed(pod, failed.reason, str(failed))
                return
            except MetricsParseError as exc:
                self._failed(pod, "parse", str(exc))
                return
            except Exception as exc:  # a surprise must cost one scrape, not the task's log
                self._failed(pod, "error", repr(exc))
                return
            elapsed = time.perf_counter() - started
        # The pod may have been deleted (or have turned unroutable) while we waited: what
        # we read must not bring back state that forget() dropped.
        current = self.registry.pod(key)
        if current is None or not current.routable:
            return
        self.store.record(key, sample)
        telemetry.METRICS_SCRAPE_DURATION.observe(elapsed)
        if self._warned_at.pop(key, None) is not None:
            log.info("metrics_scrape_recovered", pod=key)

    async def _fetch(self, pod: Pod) -> str:
        session = self._session
        if session is None:
            raise _ScrapeFailed("error", "scraper stopped")
        url = self._url(pod)
        try:
            async with asyncio.timeout(self.timeout):
                async with session.get(url, allow_redirects=False) as response:
                    if response.status != 200:
                        raise _ScrapeFailed(
                            _status_reason(response.status), f"HTTP {response.status}"
                        )
                    body = await _read_capped(response)
        except TimeoutError:
            raise _ScrapeFailed("timeout", f"no answer within {self.timeout}s") from None
        except aiohttp.ClientConnectorError as exc:
            raise _ScrapeFailed("connect", str(exc) or type(exc).__name__) from None
        except aiohttp.ClientError as exc:
            raise _ScrapeFailed("error", str(exc) or type(exc).__name__) from None
        except OSError as exc:
            raise _ScrapeFailed("connect", str(exc) or type(exc).__name__) from None
        return body.decode("utf-8", "replace")

    def _url(self, pod: Pod) -> URL:
        cached = self._urls.get(pod.key)
        address = pod.scrape_address
        if cached is None or cached[0] != address:
            cached = (address, URL(f"http://{address}{self.path}"))
            self._urls[pod.key] = cached
        return cached[1]

    def _failed(self, pod: Pod, reason: str, detail: str) -> None:
        key = pod.key
        if self.registry.pod(key) is None:
            return  # deleted meanwhile; its failure series are gone and must stay gone
        self.store.record_failure(key, reason)
        # A refused connection, or one the pod accepts and never answers (a hung or
        # stopped engine: the kernel still completes the handshake), says the pod
        # cannot serve; an HTTP error or bad text from a live engine does not.
        if reason in ("connect", "timeout") and self._on_unreachable is not None:
            self._on_unreachable(pod, reason)
        now = time.monotonic()
        last = self._warned_at.get(key)
        if last is None or now - last >= WARN_EVERY_SECONDS:
            self._warned_at[key] = now
            log.warning(
                "metrics_scrape_failed",
                pod=key,
                address=pod.scrape_address,
                reason=reason,
                detail=detail,
            )
        else:
            log.debug("metrics_scrape_failed", pod=key, reason=reason, detail=detail)

    def _forget(self, pod: Pod) -> None:
        key = pod.key
        self.store.forget(pod)
        self._urls.pop(key, None)
        self._warned_at.pop(key, None)
        task = self._scrapes.pop(key, None)
        if task is not None:
            task.cancel()


def _status_reason(status: int) -> str:
    if 400 <= status < 500:
        return "http_4xx"
    if 500 <= status < 600:
        return "http_5xx"
    return "http_other"


async def _read_capped(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_BODY_BYTES:
        raise _ScrapeFailed("parse", f"body of {response.content_length} bytes is too large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _ScrapeFailed("parse", "body too large")
        chunks.append(chunk)
    return b"".join(chunks)
