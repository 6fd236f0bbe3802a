"""Prometheus metric objects and the structlog set-up, defined once for the process."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import structlog
from prometheus_client import Counter, Gauge, Histogram

# Set by `serve --workers N` for its workers (workers.py): metrics go to shared files.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

REQUESTS = Counter(
    "gateway_requests_total",
    "Requests finished by the processor, by model, HTTP status and error code.",
    ["model", "status", "code"],
)
IN_FLIGHT = Gauge(
    "gateway_in_flight_requests",
    "Requests routed to a pod and not yet finished.",
    ["model", "pod"],
    # With serve --workers N: the sum over the running workers (each counts its own).
    multiprocess_mode="livesum",
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
    multiprocess_mode="livemax",  # every worker reads the same dictionary
)
FILTER_ERRORS = Counter(
    "gateway_stream_errors_total",
    "ext_proc streams that ended in an internal error (answered with a 500).",
)
MALFORMED_MESSAGES = Counter(
    "gateway_malformed_messages_total",
    "ext_proc streams refused (INVALID_ARGUMENT) because a message was not a "
    "ProcessingRequest: a peer that is not Envoy, or a corrupt stream.",
)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
TOKENS = Counter(
    "gateway_tokens_total",
    "Tokens reported in responses' usage, by model, pod and kind (prompt, completion).",
    ["model", "pod", "kind"],
)
TIME_TO_FIRST_TOKEN = Histogram(
    "gateway_time_to_first_token_seconds",
    "From the request reaching the processor to the first streamed event of the response.",
    ["model", "pod"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "gateway_inter_token_latency_seconds",
    "Mean time between output tokens of one streamed response, as the processor saw it.",
    ["model", "pod"],
    buckets=ITL_BUCKETS,
)
REQUEST_DURATION = Histogram(
    "gateway_request_duration_seconds",
    "From the request reaching the processor to the end of the response.",
    ["model", "pod"],
    buckets=LATENCY_BUCKETS,
)
HANDOFF_EXPIRED = Counter(
    "gateway_observer_missing_total",
    "Routed requests released as aborted because no observer stream (the observer "
    "filter's) has reached this processor for a while: the filter or the forwarding of "
    "its metadata is probably missing.",
)
HANDOFF_REFUSED = Counter(
    "gateway_handoff_claims_refused_total",
    "Observer streams refused because they claimed a session under a key this processor "
    "issued but no longer holds (already claimed, expired, or guessed): a late observer, "
    "or a peer on the gRPC port guessing keys.",
)
ALIAS_REQUESTS = Counter(
    "gateway_alias_requests_total",
    "Requests for a model alias, by alias and the target model they were sent to.",
    ["alias", "target"],
)
# The models file (models/static.py): a rejected version keeps the last good dictionary.
MODELS_RELOAD_FAILURES = Counter(
    "gateway_models_reload_failures",
    "Versions of the models file rejected (unreadable, empty, changing while read, or "
    "invalid); the last good dictionary stays in force.",
)
MODELS_RELOAD_FAILING = Gauge(
    "gateway_models_reload_failing",
    "1 while the latest version of the models file is rejected, else 0.",
    multiprocess_mode="livemax",
)
MODELS_LAST_LOAD = Gauge(
    "gateway_models_last_load_timestamp_seconds",
    "Unix time at which the dictionary in force was loaded from the models file "
    "(0: none loaded yet).",
    multiprocess_mode="livemax",
)
RESPONSES_UNPARSED = Counter(
    "gateway_responses_unparsed_total",
    "Responses passed through untouched whose body could not be read for usage.",
    ["model", "reason"],
)

# Series labelled by pod, so that a deleted pod's series can all be dropped.
_POD_SERIES: dict[str, set[str]] = {}


def note_pod_series(model: str, pod: str) -> None:
    _POD_SERIES.setdefault(pod, set()).add(model)


def forget_pod_series(pod: str) -> None:
    """Drop every Prometheus series of a deleted pod, so /metrics does not keep reporting
    pods that are gone (and series do not pile up as pods come and go)."""
    for model in _POD_SERIES.pop(pod, ()):
        remove_series(IN_FLIGHT, model, pod)
        for metric in (TIME_TO_FIRST_TOKEN, INTER_TOKEN_LATENCY, REQUEST_DURATION):
            remove_series(metric, model, pod)
        for kind in ("prompt", "completion"):
            remove_series(TOKENS, model, pod, kind)


# Unknown model names come from clients; labelling them would let anyone grow the series
# set without bound, so every model the dictionary does not know shares this label.
UNKNOWN_MODEL_LABEL = ""


# Label children looked up per request, kept: `metric.labels(...)` takes a lock and
# builds a key each time (about 1 us, several times per request).
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, cached (forgotten again by `remove_series`)."""
    key = (id(metric), labels)
    found = _CHILDREN.get(key)
    if found is None:
        found = _CHILDREN[key] = metric.labels(*labels)
    return found


def remove_series(metric: Any, *labels: str) -> None:
    """Forget one label series; a series that was never created is not an error.

    With serve --workers N (prometheus-client's multiprocess mode) a series written to
    the shared files cannot be removed: a gauge's is set to 0 first, so a deleted pod
    shows no requests in flight, and the rest stay until the workers restart."""
    _CHILDREN.pop((id(metric), tuple(labels)), None)
    if MULTIPROCESS:
        if isinstance(metric, Gauge):
            metric.labels(*labels).set(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "not implemented" in that mode
            with contextlib.suppress(KeyError):
                metric.remove(*labels)
        return
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


class LogLimit:
    """At most one log line per `every` seconds for each kind of event, so a peer that
    repeats a bad request cannot flood the log. `allow(kind)` is None when this one is
    held back, else how many of its kind were held back since the last line (worth
    saying in that line)."""

    def __init__(self, every: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def allow(self, kind: str) -> int | None:
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._every:
            self._held[kind] = self._held.get(kind, 0) + 1
            return None
        self._last[kind] = now
        return self._held.pop(kind, 0)


class _GrpcCallErrors(logging.Filter):
    """gRPC logs an exception raised for a call (a request that does not decode, sent
    to the health service, say) with its whole traceback, once per call: anyone who
    reaches the port could fill the log. Such a record becomes one line of ours, at
    most one per kind of error every 10 s, with the count held back."""

    def __init__(self) -> None:
        super().__init__()
        self._limit = LogLimit(every=10.0)
        self._log = structlog.get_logger("gateway_extproc.grpc")

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        held_back = self._limit.allow(type(exc).__name__)
        if held_back is not None:
            event = (
                "malformed_message" if type(exc).__name__ == "DecodeError" else "grpc_call_failed"
            )
            self._log.warning(
                event,
                call=" ".join(record.getMessage().split())[:200],
                problem=f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500],
                held_back=held_back,
            )
        return False


def _orjson_text(event: Any, **_: Any) -> str:
    # orjson renders a log line several times faster than json.dumps; the access log
    # writes one per request.
    return orjson.dumps(event, default=str).decode()


def configure_logging(level: str = "info", fmt: str = "json") -> None:
    """Structured logs to stderr: JSON for machines, `console` for people."""
    level_no = logging.getLevelName(level.upper())
    if not isinstance(level_no, int):
        raise ValueError(f"unknown log level {level!r}")
    logging.basicConfig(stream=sys.stderr, level=level_no, format="%(message)s", force=True)
    grpc_logger = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _GrpcCallErrors) for f in grpc_logger.filters):
        grpc_logger.addFilter(_GrpcCallErrors())
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False)
        if fmt == "console"
        else structlog.processors.JSONRenderer(serializer=_orjson_text)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            utc_timestamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level_no),
        logger_factory=_batched_factory(sys.stderr),
        cache_logger_on_first_use=True,
    )


class _UtcTimestamp:
    """The processor that stamps each line `timestamp`: ISO 8601 UTC with microseconds,
    as structlog's TimeStamper(fmt="iso", utc=True) writes it (which drops the fraction
    when it is 0; this always writes six digits). That one built a datetime per line,
    2 us of the access log's ~7; here the text up to the second is made once a second."""

    def __init__(self) -> None:
        self._second: tuple[int, str] = (-1, "")

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        now = time.time()
        second = int(now)
        cached = self._second
        if cached[0] != second:
            cached = self._second = (
                second,
                time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)),
            )
        event["timestamp"] = f"{cached[1]}.{int((now - second) * 1e6):06d}Z"
        return event


utc_timestamp = _UtcTimestamp()


# -- log lines written in batches ---------------------------------------------------------

# How long a line logged on the event loop may wait to be written with others.
FLUSH_AFTER_S = 0.05
# At most this many bytes per write(): a pipe writes up to PIPE_BUF (4096 on Linux) in one
# piece, so the lines of `serve --workers N`, which share the supervisor's stderr, never
# interleave mid-line.
MAX_WRITE_BYTES = 4096


class BatchedLineWriter:
    """structlog's output: lines logged on a running event loop are kept and written
    together at most FLUSH_AFTER_S later, in writes of at most MAX_WRITE_BYTES; a line
    logged with no loop running in its thread (start-up, shutdown, worker threads) is
    written at once, after those kept. Written one by one, the access log's line per
    request was a write() system call per request (6.9% of the processor's native samples
    under the overhead load, docs/BENCHMARKS.md section 6). `flush()` writes what is kept:
    the server calls it when it stops (`flush_logs`) and, for any other way out, at exit."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._lines: list[str] = []
        self._lock = threading.Lock()
        self._timer_loop: asyncio.AbstractEventLoop | None = None  # a flush is scheduled there

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            self._lines.append(message + "\n")
            if loop is None:
                self._write_kept()
            elif self._timer_loop is not loop:
                self._timer_loop = loop
                loop.call_later(FLUSH_AFTER_S, self.flush)

    # structlog calls the method named as the level; every level is a line alike.
    log = debug = info = warning = warn = error = err = critical = exception = fatal = msg

    def flush(self) -> None:
        with self._lock:
            self._timer_loop = None
            self._write_kept()

    def _write_kept(self) -> None:
        lines, self._lines = self._lines, []
        if not lines:
            return
        chunk: list[str] = []
        size = 0
        for line in lines:
            length = len(line) if line.isascii() else len(line.encode())  # bytes written
            if chunk and size + length > MAX_WRITE_BYTES:
                self._write("".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += length
        self._write("".join(chunk))

    def _write(self, text: str) -> None:
        try:
            self._file.write(text)
            self._file.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone (a reader that left): nothing to tell anyone


_WRITERS: dict[int, BatchedLineWriter] = {}


def _batched_factory(file: Any) -> Callable[..., BatchedLineWriter]:
    """One writer per output file, shared by every logger (and kept across
    `configure_logging` calls, so no line kept by an earlier one is left behind)."""
    writer = _WRITERS.get(id(file))
    if writer is None or writer._file is not file:
        if writer is not None:
            writer.flush()
        writer = _WRITERS[id(file)] = BatchedLineWriter(file)
    return lambda *_args: writer


def flush_logs() -> None:
    """Write every log line still kept (the server calls this as it stops)."""
    for writer in list(_WRITERS.values()):
        writer.flush()


atexit.register(flush_logs)


# -- engine metrics and metrics-driven routing (gateway_extproc.metrics, .routing) ---------

METRICS_SCRAPE_FAILURES = Counter(
    "gateway_metrics_scrape_failures_total",
    "Failed scrapes of a pod's engine /metrics, by pod and reason.",
    ["pod", "reason"],
)
METRICS_SCRAPE_DURATION = Histogram(
    "gateway_metrics_scrape_duration_seconds",
    "Time to fetch and parse one pod's engine /metrics (successful scrapes).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
METRICS_ROUND = Gauge(
    "gateway_metrics_round_seconds",
    "Length of the latest completed round of engine metrics scrapes (its period, or the "
    "time until its last scrape ended if longer). Above the metrics staleness, metrics stay "
    "in use until the next round completes.",
    multiprocess_mode="livemax",
)
POD_COLDSTART = Histogram(
    "pod_coldstart_duration_seconds",
    "From a pod first seen routable to its first successfully scraped engine metrics.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
ROUTING_FALLBACK = Counter(
    "gateway_routing_fallback_total",
    "Routing decisions whose pick was made without the data the strategy needed.",
    ["strategy", "reason"],
)

# -- KV-cache events and precise prefix routing (gateway_extproc.kvevents, .tokenize) ------

KV_EVENTS = Counter(
    "gateway_kv_events_total",
    "KV-cache events read from the engines' event streams, by type (unknown: a kind this "
    "gateway does not know, skipped).",
    ["type"],
)
KV_EVENTS_MALFORMED = Counter(
    "gateway_kv_events_malformed_total",
    "KV-cache event messages, payloads or single events that could not be read and were "
    "skipped, by what was wrong (message, payload, event).",
    ["what"],
)
KV_EVENT_GAPS = Counter(
    "gateway_kv_event_gaps_total",
    "Sequence gaps in a pod's event stream (batches lost), each followed by a replay when "
    "the pod has a replay endpoint.",
)
KV_EVENT_REPLAYS = Counter(
    "gateway_kv_event_replays_total",
    "Replays asked of a pod's replay endpoint, by outcome (filled: every missing batch "
    "came; incomplete: the publisher no longer held them; failed: no valid answer).",
    ["outcome"],
)
KV_EVENT_DEAD_STREAMS = Counter(
    "gateway_kv_event_dead_streams_total",
    "Times a pod's event socket was found dead (not connected for the dead-after time, or "
    "its endpoint refused); the pod is routed by approximate prefix matching meanwhile.",
)
KV_EVENT_UNRELIABLE_PODS = Gauge(
    "gateway_kv_event_unreliable_pods",
    "Pods with an event endpoint whose block index is not used for routing now (not "
    "connected, or events lost and not yet rebuilt): they get approximate prefix scores.",
)
KV_TEXT_BLOCKS = Gauge(
    "gateway_kv_text_blocks",
    "Held blocks whose text is kept so a long prompt can be matched without tokenizing "
    "all of it (about 200 bytes each; bounded, the oldest dropped first).",
)
PROMPT_TEXT_MATCHES = Counter(
    "gateway_prompt_text_matches_total",
    "Prompts walked against the held blocks' text before tokenizing, by outcome "
    "(matched: tokenized only from near the end of the match; tokenized: from the start, "
    "no usable match or its pieces already cached).",
    ["outcome"],
)
PROMPT_TOKENIZE = Counter(
    "gateway_prompt_tokenizations_total",
    "Requests whose prompt was rendered and tokenized for precise prefix routing, by "
    "outcome (done, no_tokenizer, failed, busy, unsupported).",
    ["outcome"],
)

# -- passive health (gateway_extproc.routing.health) ---------------------------------------

POD_EJECTIONS = Counter(
    "gateway_pod_ejections_total",
    "Times a pod was left out of routing after consecutive failures (connect failures, "
    "timeouts, 5xx, refused or unanswered metrics scrapes), by pod.",
    ["pod"],
)
PODS_EJECTED = Gauge(
    "gateway_pods_ejected",
    "Pods ejected and not yet let back in by a successful request.",
)

# -- flow control (gateway_extproc.flowcontrol) -------------------------------------------

# Priority labels: the priorities the flow config names (and 0); any other is `other`.
OTHER_PRIORITY_LABEL = "other"
FLOW_QUEUE_LENGTH = Gauge(
    "gateway_flow_queue_length",
    "Requests held in the processor until a pod has room (or the model's first pod is "
    "ready), by model and priority.",
    ["model", "priority"],
)
FLOW_QUEUE_WAIT = Histogram(
    "gateway_flow_queue_wait_seconds",
    "Time held requests waited in the processor before they were routed or refused, by "
    "model and priority.",
    ["model", "priority"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
FLOW_REJECTIONS = Counter(
    "gateway_flow_rejections_total",
    "Requests refused by flow control, by model and reason (queue_timeout, request_shed, "
    "no_ready_pods, rate_limit_requests, rate_limit_tokens).",
    ["model", "reason"],
)
FLOW_ABANDONED = Counter(
    "gateway_flow_abandoned_total",
    "Held requests whose client left before they were routed (dropped from the queue).",
    ["model"],
)
TENANT_TOKENS = Counter(
    "gateway_tenant_tokens_total",
    "Tokens used, by tenant (fairness id; ids that no rate limit names share `other`) and "
    "kind (prompt, completion).",
    ["tenant", "kind"],
)
RATE_LIMIT_STORE_ERRORS = Counter(
    "gateway_rate_limit_store_errors_total",
    "Failed calls to the shared rate-limit store (Redis); the requests were let through.",
)
