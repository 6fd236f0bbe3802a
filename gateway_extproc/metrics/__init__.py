"""Engine metrics: the scraper, the per-pod store with staleness and cold start, and the
parser for the engine's Prometheus text. Routing reads `MetricsStore`; nothing here reads
routing."""

from gateway_extproc.metrics.parser import EngineSample, MetricsParseError, parse_engine_metrics
from gateway_extproc.metrics.scraper import MetricsScraper
from gateway_extproc.metrics.store import SCRAPE_FAILURE_REASONS, MetricsStore, PodMetrics

__all__ = [
    "SCRAPE_FAILURE_REASONS",
    "EngineSample",
    "MetricsParseError",
    "MetricsScraper",
    "MetricsStore",
    "PodMetrics",
    "parse_engine_metrics",
]
