"""The product's own Python per request, without gRPC or Envoy: a whole processor
(`start_gateway`, production defaults: the default routing profile, flow control, JSON
access log) in this process, and each request's two streams driven straight into
`ExternalProcessor.Process` as the shipped two-filter envoy/envoy.yaml sends them: the
routing stream (request headers, buffered body; the processor ends it after its answer)
and the observer stream (request headers, the response body, its end, in observability
mode, carrying the routing answer's handoff metadata). CPU is `time.process_time()`.

    .venv/bin/python -m bench.request_cost [--requests N] [--profile]

The overhead section's floor row runs no product code at all, so this figure is most of
what separates the product from that floor, measured without the noise of a loaded
machine's sockets and threads. `--profile` runs the same loop under cProfile (slower;
for where the time goes, not how much). The access log goes to stderr: redirect it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import uvloop
from aiohttp import web
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from bench import payloads
from gateway_extproc import server, telemetry
from gateway_extproc.cli import build_parser
from gateway_extproc.config import settings_from_args
from gateway_extproc.extproc.envoy_names import (
    ATTRIBUTES_KEY,
    HANDOFF_NAMESPACE,
    OBSERVE_ROLE,
    ROLE_METADATA,
    ROUTE_ROLE,
    STATUS_ATTRIBUTE,
)
from gateway_extproc.extproc.service import ExternalProcessor
from tests import frames

METRICS_PAGE = "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"


class _Context:
    """What the servicer reads of a gRPC call: the stream's role."""

    def __init__(self, role: str) -> None:
        self._metadata = ((ROLE_METADATA, role),)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"the processor aborted the stream: {details}")


async def _frames(items: Iterable[ext.ProcessingRequest]) -> AsyncIterator[ext.ProcessingRequest]:
    for item in items:
        yield item


class Driver:
    def __init__(self, processor: ExternalProcessor) -> None:
        self.processor = processor
        self.headers = frames.request_headers(
            headers={"x-request-id": "5f1c0e1f-3b7e-4f3c-9a51-3cf0d6a2b9e4"}
        )
        self.body = frames.request_body(payloads.chat_request())
        self.response = frames.response_body(payloads.chat_completion())
        self.response.observability_mode = True
        self.response.attributes[ATTRIBUTES_KEY].fields[STATUS_ATTRIBUTE].number_value = 200
        self.end = frames.response_body(b"", end_of_stream=True)
        self.end.observability_mode = True

    async def request(self) -> None:
        process = self.processor.Process
        routing = process(_frames((self.headers, self.body)), _Context(ROUTE_ROLE))
        answers = [answer async for answer in routing]
        handoff = answers[-1].dynamic_metadata.fields[HANDOFF_NAMESPACE].struct_value
        observed = ext.ProcessingRequest()
        observed.CopyFrom(self.headers)
        observed.observability_mode = True
        observed.metadata_context.filter_metadata[HANDOFF_NAMESPACE].CopyFrom(handoff)
        stream = (observed, self.response, self.end)
        async for _ in process(_frames(stream), _Context(OBSERVE_ROLE)):
            pass


async def _metrics_pod() -> tuple[web.AppRunner, int]:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(text=METRICS_PAGE)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, port


async def measure(requests: int, profile: bool) -> float:
    pod, port = await _metrics_pod()
    with tempfile.TemporaryDirectory() as work:
        models = Path(work) / "models.yaml"
        models.write_text(
            f"models:\n- name: {payloads.BENCH_MODEL}\n  pods:\n"
            f"  - name: pod-0\n    address: 127.0.0.1:{port}\n",
            encoding="utf-8",
        )
        argv = ["serve", "--models-file", str(models), "--grpc-port", "0", "--admin-port", "0"]
        settings = settings_from_args(build_parser().parse_args(argv))
        telemetry.configure_logging("info", "json")
        gateway = await server.start_gateway(settings)
        # As `serve` does once started: what start-up built stays out of the collector's
        # full passes.
        gc.collect()
        gc.freeze()
        try:
            driver = Driver(gateway.processor)
            for _ in range(300):  # warm-up, and the first engine metrics scraped
                await driver.request()
            best = float("inf")
            for _ in range(3):
                started = time.process_time()
                for _ in range(requests):
                    await driver.request()
                best = min(best, (time.process_time() - started) / requests * 1e6)
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                for _ in range(requests):
                    await driver.request()
                profiler.disable()
                stats = pstats.Stats(profiler, stream=sys.stdout)
                stats.sort_stats("cumulative").print_stats(40)
        finally:
            await server.stop_gateway(gateway)
            await pod.cleanup()
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    best = uvloop.run(measure(args.requests, args.profile))
    print(
        f"product Python per request (both streams, defaults, no gRPC): {best:.1f} µs CPU "
        f"(best of 3 x {args.requests})"
    )


if __name__ == "__main__":
    main()
