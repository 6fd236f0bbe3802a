"""Prometheus metric objects and the structlog set-up, defined once for the process."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests finished by the processor, by model, HTTP status and error code.",
    ["model", "status", "code"],
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests routed to a pod and not yet finished.",
    ["model", "pod"],
)
ROUTING_DECISION = Histogram(
    "gateway_routing_decision_seconds",
    "Time to pick a pod for one request.",
    buckets=(1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2),
)
MODELS_BY_STATE = Gauge(
    "gateway_models",
    "Models in the dictionary, by state.",
    ["state"],
)
FILTER_ERRORS = Counter(
    "gateway_stream_errors_total",
    "ext_proc streams that ended in an internal error (answered with a 500).",
)

# Unknown model names come from clients; labelling them would let anyone grow the series
# set without bound, so every model the dictionary does not know shares this label.
UNKNOWN_MODEL_LABEL = ""


def remove_series(metric: Any, *labels: str) -> None:
    """Forget one label series; a series that was never created is not an error."""
    try:
        metric.remove(*labels)
    except KeyError:
        pass


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Structured logs to stderr: JSON for machines, `console` for people."""
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(stream=sys.stderr, level=level_no, format="%(message)s", force=True)
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
