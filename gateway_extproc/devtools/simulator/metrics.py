"""The engine's Prometheus metrics under vLLM V1 names, one registry per simulator.

Each simulator owns a CollectorRegistry so several can run in one process (tests,
benchmarks). Event metrics (tokens, latencies, prefix-cache counters) are ordinary
prometheus_client objects; state metrics (running, waiting, KV usage, LoRA and cache
info) are read from the engine at scrape time so they can never drift from it.
Every sample carries `model_name` (the base model) and `engine="0"`, as vLLM's do.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway_extproc.devtools.simulator.config import SimulatorConfig

# vLLM's exposition content type (text format 0.0.4); scrapers of real engines see it.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Bucket bounds as vLLM uses them, so dashboards and quantile maths carry over.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip

LABELS = ("model_name", "engine")
ENGINE_INDEX = "0"

# vLLM keeps one `lora_requests_info` series per adapter combination it ever saw, each
# valued with the time that combination was last current; readers take the newest.
# The simulator does the same, bounded so a long run cannot grow without limit.
MAX_LORA_SERIES = 32


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    running: int
    waiting: int
    kv_usage: float
    running_adapters: tuple[str, ...]
    waiting_adapters: tuple[str, ...]


class EngineMetrics:
    """The metric objects the engine updates, and the rendering of all of them."""

    def __init__(self, config: SimulatorConfig, snapshot: Callable[[], EngineSnapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        values = (config.base_model, ENGINE_INDEX)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, LABELS, registry=self.registry).labels(*values)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            metric = Histogram(name, doc, LABELS, buckets=buckets, registry=self.registry)
            return metric.labels(*values)

        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter(
            "vllm:generation_tokens", "Number of generation tokens processed."
        )
        self.prefix_cache_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
        )
        self.prefix_cache_hits = counter(
            "vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached tokens."
        )
        self.time_to_first_token = histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS,
        )
        self.inter_token_latency = histogram(
            "vllm:inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            ITL_BUCKETS,
        )
        self.e2e_request_latency = histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            E2E_BUCKETS,
        )
        self.registry.register(_StateCollector(config, snapshot))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    def __init__(self, config: SimulatorConfig, snapshot: Callable[[], EngineSnapshot]) -> None:
        self._snapshot = snapshot
        self._values = [config.base_model, ENGINE_INDEX]
        self._max_lora = str(len(config.loras))
        self._cache_info = {
            "block_size": str(config.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "num_gpu_blocks": str(config.kv_blocks),
            "num_cpu_blocks": "0",
        }
        self._lora_seen: dict[tuple[str, str], float] = {}

    def describe(self) -> list[Metric]:
        # Registration must not take a snapshot (the engine may not be built yet).
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._snapshot()
        yield self._gauge(
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            state.running,
        )
        yield self._gauge(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            state.waiting,
        )
        yield self._gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            state.kv_usage,
        )
        yield self._lora_info(state)
        info = GaugeMetricFamily(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=[*LABELS, *self._cache_info],
        )
        info.add_metric([*self._values, *self._cache_info.values()], 1.0)
        yield info

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        family = GaugeMetricFamily(name, doc, labels=list(LABELS))
        family.add_metric(self._values, value)
        return family

    def _lora_info(self, state: EngineSnapshot) -> GaugeMetricFamily:
        current = (",".join(state.running_adapters), ",".join(state.waiting_adapters))
        self._lora_seen.pop(current, None)
        self._lora_seen[current] = time.time()  # newest last: the dict is the LRU order
        while len(self._lora_seen) > MAX_LORA_SERIES:
            del self._lora_seen[next(iter(self._lora_seen))]
        family = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            labels=[*LABELS, "max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        for (running, waiting), seen in self._lora_seen.items():
            family.add_metric([*self._values, self._max_lora, running, waiting], seen)
        return family
