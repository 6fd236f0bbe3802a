"""`serve --workers N`: N processes serve one gRPC port; one admin port speaks for all.

A Python process uses one core, so a processor on a node with several cores runs N
worker processes, each a whole `serve` (its own discovery, scraper, router and gRPC
server), all listening on the same gRPC port. The kernel spreads Envoy's connections
over them (SO_REUSEPORT); every ext_proc stream of one connection stays in one worker,
so the routing and observer streams of a request, which Envoy sends on the same
connection, meet in the worker that routed it.

This supervisor process serves no stream. It

- makes sure the gRPC port is free before any worker binds it (an exclusive bind, as a
  single `serve` does): only these workers join the port, a stranger gets "in use";
- starts the workers and restarts any that dies (logged, `gateway_worker_restarts_total`);
  one that dies before the first time all were ready fails the start instead;
- serves the admin port: `/metrics` adds up every worker's metrics (prometheus-client's
  multiprocess mode, in a private PROMETHEUS_MULTIPROC_DIR), `/readyz` is ready when
  every worker is (and 503 from the moment it is told to stop), `/debug/models` is the
  workers' dictionary with their in-flight counts added up;
- on SIGTERM passes the signal on, so each worker drains (--drain-delay, then
  --grace-period), and exits 0 once they all have.

Each worker's admin app listens on a Unix socket in the supervisor's private directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web

from gateway_extproc import server, telemetry
from gateway_extproc.config import Settings

log = structlog.get_logger("gateway_extproc.workers")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CHECK_EVERY_S = 0.2
# A worker that keeps dying is restarted at most this often (doubling from 1 s).
MAX_BACKOFF_S = 30.0
WORKER_ASK_TIMEOUT_S = 2.0


@dataclass
class Worker:
    index: int
    admin_path: str
    process: BaseProcess | None = None
    started_at: float = 0.0
    restart_at: float = 0.0
    # Seconds before restarting it after its next death: doubles while it keeps dying.
    backoff: float = 1.0


class Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = False
        self.all_ready_once = False
        self.restarts = 0
        self._dir = Path(tempfile.mkdtemp(prefix="gateway-extproc-"))
        self._workers = [
            Worker(i, str(self._dir / f"worker-{i}.sock")) for i in range(settings.workers)
        ]
        self._context = multiprocessing.get_context("spawn")
        self._grpc_port = 0

    # -- life cycle ----------------------------------------------------------------------

    async def run(self) -> None:
        self._grpc_port = claim_port(self.settings.listen_host, self.settings.grpc_port)
        metrics_dir = self._dir / "metrics"
        metrics_dir.mkdir()
        # Read by prometheus-client when a worker imports it: every worker writes its
        # metrics to files here, which /metrics below adds up.
        os.environ[MULTIPROC_ENV] = str(metrics_dir)
        admin = await self._start_admin()
        stop, hurry = server.stop_signals()
        try:
            for worker in self._workers:
                self._start(worker)
            log.info(
                "workers_started",
                workers=len(self._workers),
                grpc_port=self._grpc_port,
                admin_port=self.settings.admin_port,
            )
            while not stop.is_set():
                self._check_workers()
                if not self.all_ready_once and await self._all_ready():
                    self.all_ready_once = True
                    log.info("workers_ready", workers=len(self._workers))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=CHECK_EVERY_S)
            self.stopping = True
            await self._stop_workers(hurry)
        finally:
            self.stopping = True
            self._kill_workers()
            await admin.cleanup()
            shutil.rmtree(self._dir, ignore_errors=True)
        log.info("workers_stopped")

    def _start(self, worker: Worker) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(worker.admin_path)
        worker_settings = replace(self.settings, grpc_port=self._grpc_port, workers=1)
        process = self._context.Process(
            target=worker_main,
            args=(worker_settings, worker.index, worker.admin_path, os.getpid()),
            name=f"gateway-extproc-worker-{worker.index}",
        )
        process.start()
        worker.process = process
        worker.started_at = time.monotonic()

    def _check_workers(self) -> None:
        from prometheus_client import multiprocess

        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is None:  # dead, waiting for its restart
                if now >= worker.restart_at:
                    self._start(worker)
                continue
            if process.is_alive():
                if now - worker.started_at > MAX_BACKOFF_S:
                    worker.backoff = 1.0  # it has run a while: restart the next death fast
                continue
            # Its live gauges (in-flight counts) no longer count; its counters still do.
            if process.pid is not None:
                multiprocess.mark_process_dead(process.pid)
            if not self.all_ready_once:
                raise OSError(
                    f"worker {worker.index} exited with status {process.exitcode} "
                    "before every worker was ready"
                )
            self.restarts += 1
            log.error(
                "worker_died",
                worker=worker.index,
                pid=process.pid,
                exitcode=process.exitcode,
                restart_in_s=worker.backoff,
            )
            worker.process = None
            worker.restart_at = now + worker.backoff
            worker.backoff = min(worker.backoff * 2, MAX_BACKOFF_S)

    async def _stop_workers(self, hurry: asyncio.Event) -> None:
        """SIGTERM every worker (SIGINT when hurried: they skip the drain delay) and wait
        for them, up to the longest a worker's own drain may take."""
        sig = signal.SIGINT if hurry.is_set() else signal.SIGTERM
        log.info("workers_stopping", workers=len(self._workers), signal=sig.name)
        self._signal_all(sig)
        budget = self.settings.drain_delay + self.settings.grace_period + 5.0
        deadline = time.monotonic() + budget
        hurried = hurry.is_set()
        while any(w.process is not None and w.process.is_alive() for w in self._workers):
            if time.monotonic() > deadline:
                log.warning("workers_did_not_stop", budget_s=budget)
                return
            if hurry.is_set() and not hurried:
                hurried = True
                self._signal_all(signal.SIGINT)  # a second signal: skip the drain delay
            await asyncio.sleep(CHECK_EVERY_S)

    def _signal_all(self, sig: signal.Signals) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.is_alive() and process.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, sig)

    def _kill_workers(self) -> None:
        for worker in self._workers:
            process = worker.process
            if process is not None and process.is_alive():
                process.kill()
                process.join(5)

    # -- the admin port ------------------------------------------------------------------

    async def _start_admin(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", _healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/debug/models", self._debug_models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.settings.listen_host, self.settings.admin_port).start()
        except OSError as exc:
            await runner.cleanup()
            raise server.cannot_listen(
                self.settings.listen_host, self.settings.admin_port, "admin", exc
            ) from None
        return runner

    async def _metrics(self, _: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        registry.register(_SupervisorCollector(self))
        body = await asyncio.to_thread(generate_latest, registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _readyz(self, _: web.Request) -> web.Response:
        if self.stopping:
            return web.Response(status=503, text="not ready: shutting down (draining)\n")
        answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in self._workers))
        waiting = [
            f"worker {w.index}: {text.strip() or 'not running'}"
            for w, (status, text) in zip(self._workers, answers, strict=True)
            if status != 200
        ]
        if waiting:
            return web.Response(status=503, text="not ready: " + "; ".join(waiting) + "\n")
        # A ready worker's further lines (a rejected models file reload), said once.
        notes = dict.fromkeys(
            line for _, text in answers for line in text.splitlines()[1:] if line.strip()
        )
        lines = [f"ready ({len(self._workers)} workers)", *notes]
        return web.Response(text="\n".join(lines) + "\n")

    async def _all_ready(self) -> bool:
        answers = await asyncio.gather(*(self._ask(w, "/readyz") for w in self._workers))
        return all(status == 200 for status, _ in answers)

    async def _debug_models(self, _: web.Request) -> web.Response:
        answers = await asyncio.gather(*(self._ask(w, "/debug/models") for w in self._workers))
        views = [orjson.loads(text) for status, text in answers if status == 200]
        if not views:
            return web.Response(status=503, text="no worker answered\n")
        return web.Response(
            body=orjson.dumps(merge_debug_views(views), option=orjson.OPT_INDENT_2),
            content_type="application/json",
        )

    async def _ask(self, worker: Worker, path: str) -> tuple[int, str]:
        """GET `path` from a worker's admin app: (status, body), (0, "") if it is down."""
        if worker.process is None or not worker.process.is_alive():
            return 0, ""
        try:
            connector = aiohttp.UnixConnector(path=worker.admin_path)
            timeout = aiohttp.ClientTimeout(total=WORKER_ASK_TIMEOUT_S)
            async with (
                aiohttp.ClientSession(connector=connector, timeout=timeout) as client,
                client.get(f"http://worker{path}") as response,
            ):
                return response.status, await response.text()
        except (aiohttp.ClientError, OSError, TimeoutError):
            return 0, ""


async def _healthz(_: web.Request) -> web.Response:
    return web.Response(text="ok\n")


def merge_debug_views(views: list[dict[str, Any]]) -> dict[str, Any]:
    """The first worker's /debug/models with every pod's in-flight count summed over all
    workers (each counts only the requests it routed)."""
    merged: dict[str, Any] = orjson.loads(orjson.dumps(views[0]))
    counts: dict[tuple[str, str], int] = {}
    for view in views:
        for model, entry in view.get("models", {}).items():
            for pod in entry.get("pods", []):
                key = (model, pod["name"])
                counts[key] = counts.get(key, 0) + int(pod.get("in_flight", 0))
    for model, entry in merged.get("models", {}).items():
        for pod in entry.get("pods", []):
            pod["in_flight"] = counts.get((model, pod["name"]), 0)
    merged["synced"] = all(view.get("synced", False) for view in views)
    return merged


class _SupervisorCollector:
    """The supervisor's own metrics, computed when scraped."""

    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        workers = self._supervisor._workers
        alive = sum(1 for w in workers if w.process is not None and w.process.is_alive())
        running = GaugeMetricFamily(
            "gateway_workers_running", "Worker processes of serve --workers that are running."
        )
        running.add_metric([], alive)
        yield running
        restarts = CounterMetricFamily(
            "gateway_worker_restarts", "Worker processes restarted after they died."
        )
        restarts.add_metric([], self._supervisor.restarts)
        yield restarts


def claim_port(host: str, port: int) -> int:
    """The gRPC port the workers will share, checked free by an exclusive bind (no
    SO_REUSEPORT): if anything holds it, even a socket that allows sharing, this fails,
    so the workers never join a stranger's port. Port 0 picks a free one."""
    return server.check_port_free(host, port, "gRPC")


def worker_main(settings: Settings, index: int, admin_path: str, parent_pid: int) -> None:
    """A worker process: a whole `serve` on the shared port, its admin app on a socket."""
    telemetry.configure_logging(settings.log_level, settings.log_format)
    structlog.contextvars.bind_contextvars(worker=index)
    try:
        server.run_loop(
            server.serve(settings, share_port=True, admin_path=admin_path, parent_pid=parent_pid)
        )
    except (OSError, ValueError) as exc:  # as `serve` says it: one line, no traceback
        log.error("worker_failed_to_start", problem=str(exc))
        raise SystemExit(1) from None
    except KeyboardInterrupt:
        pass


def run(settings: Settings, unknown_environment: list[str] | None = None) -> int:
    telemetry.configure_logging(settings.log_level, settings.log_format)
    if unknown_environment:
        log.warning(
            "unknown_environment_variables",
            names=unknown_environment,
            hint="no flag reads these; see docs/configuration.md",
        )
    try:
        server.run_loop(Supervisor(settings).run())
    except OSError as exc:
        log.error("gateway_failed_to_start", problem=str(exc))
        return 1
    return 0
