"""Response accounting: tokens, time to first token, inter-token latency, duration.

Fed the response as Envoy forwards it. A JSON body is reassembled and parsed once at the
end; an SSE stream is parsed incrementally. Where the usage is and which events carry
output is the API's business (apis/: a `UsageReader` per response). Nothing here changes
what the client gets: a body that cannot be read (an engine's plain-text error, say) is
only counted.
"""

from __future__ import annotations

import orjson

from gateway_extproc import telemetry
from gateway_extproc.apis import UsageReader
from gateway_extproc.apis.openai_chat import ChatUsage
from gateway_extproc.openai.sse import SSEParser
from gateway_extproc.openai.usage import Usage

# Past this a JSON response is not kept for usage (it is still passed on untouched).
MAX_ACCOUNTED_BODY = 8 * 1024 * 1024

_SSE_OPENINGS = (b"data:", b"event:", b"id:", b"retry:", b":")
_SNIFF_BYTES = max(len(opening) for opening in _SSE_OPENINGS)


class ResponseAccounting:
    __slots__ = (
        "_body",
        "_body_size",
        "_events",
        "_first_event_at",
        "_last_event_at",
        "_reader",
        "_sniff",
        "_sse",
        "_started",
        "_unparsed",
        "completed",
        "usage",
    )

    def __init__(self, started: float, reader: UsageReader | None = None) -> None:
        self._started = started
        self._reader = reader if reader is not None else ChatUsage()
        self._sse: SSEParser | None = None
        self._sniff = False
        self._body: list[bytes] = []
        self._body_size = 0
        self._events = 0
        self._first_event_at = 0.0
        self._last_event_at = 0.0
        self._unparsed = ""
        self.usage: Usage | None = None
        # The SSE stream's end mark (its API's: `[DONE]`, `response.completed`,
        # `message_stop`, ...) went by: the client has it all.
        self.completed = False

    def on_headers(self, content_type: str) -> None:
        if content_type.startswith("text/event-stream"):
            self._sse = SSEParser()
        # Unknown when Envoy skips the response headers (envoy/envoy.yaml): the body's
        # first bytes tell, as an SSE stream opens with a field name or a comment.
        self._sniff = not content_type

    def on_chunk(self, chunk: bytes, now: float) -> None:
        if self._sse is not None:
            self._on_events(self._sse.feed(chunk), now)
        elif self._body_size <= MAX_ACCOUNTED_BODY:
            self._body.append(chunk)
            self._body_size += len(chunk)
            if self._sniff:
                self._sniff_stream(now, final=False)

    def on_end(self, now: float) -> None:
        if self._sniff:
            self._sniff_stream(now, final=True)
        if self._sse is not None:
            self._on_events(self._sse.close(), now)
            return
        if not self._body_size:
            return
        if self._body_size > MAX_ACCOUNTED_BODY:
            self._unparsed = "too_large"
            return
        try:
            self._reader.read_body(orjson.loads(b"".join(self._body)))
            self.usage = self._reader.usage
        except orjson.JSONDecodeError:
            self._unparsed = "not_json"
        self._body = []

    def _sniff_stream(self, now: float, *, final: bool) -> None:
        """Decide JSON or SSE once enough of the body is in (a first chunk can be a few
        bytes); an SSE stream gets the kept chunks replayed into its parser."""
        head = b"".join(self._body).lstrip()
        if len(head) < _SNIFF_BYTES and not final:
            return
        self._sniff = False
        if head.startswith(_SSE_OPENINGS):
            self._sse = SSEParser()
            kept, self._body, self._body_size = self._body, [], 0
            for chunk in kept:
                self._on_events(self._sse.feed(chunk), now)

    def _on_events(self, events: list[bytes], now: float) -> None:
        reader = self._reader
        for data in events:
            if not reader.read_event(data):
                self.usage = reader.usage
                self.completed = reader.ended
                continue  # usage, the end mark, or an event about the stream itself
            if not self._first_event_at:
                self._first_event_at = now
            self._last_event_at = now
            self._events += 1

    def ttft(self) -> float | None:
        return self._first_event_at - self._started if self._first_event_at else None

    def inter_token_latency(self) -> float | None:
        """Mean gap between tokens: per completion token when usage says how many,
        else per streamed event."""
        if self._events < 2:
            return None
        gaps = self._events - 1
        if self.usage is not None and self.usage.completion_tokens > 1:
            gaps = self.usage.completion_tokens - 1
        return (self._last_event_at - self._first_event_at) / gaps

    def record(self, model: str, pod: str, finished_at: float) -> None:
        """Observe this response in Prometheus, once, under `model` and `pod`."""
        if self._unparsed:
            telemetry.RESPONSES_UNPARSED.labels(model, self._unparsed).inc()
        if not pod:
            return
        telemetry.note_pod_series(model, pod)
        child = telemetry.child
        child(telemetry.REQUEST_DURATION, model, pod).observe(finished_at - self._started)
        ttft = self.ttft()
        if ttft is not None:
            child(telemetry.TIME_TO_FIRST_TOKEN, model, pod).observe(ttft)
        itl = self.inter_token_latency()
        if itl is not None:
            child(telemetry.INTER_TOKEN_LATENCY, model, pod).observe(itl)
        if self.usage is not None:
            child(telemetry.TOKENS, model, pod, "prompt").inc(self.usage.prompt_tokens)
            child(telemetry.TOKENS, model, pod, "completion").inc(self.usage.completion_tokens)
