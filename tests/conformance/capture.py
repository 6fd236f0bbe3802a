"""Capture the conformance recordings from real Envoy traffic (run by hand).

    .venv/bin/python -m tests.conformance.capture [--only NAME ...] [--keep-logs]

It starts real simulated engines on the ready pods of `tests/conformance/models.yaml`,
the processor (`serve --record-dir`) on that file, and three real Envoys: the shipped
`envoy/envoy.yaml` in its one-filter shape (`buffered_bootstrap`: request body BUFFERED,
response headers and STREAMED body on the same stream, as Envoy Gateway sets it up), the
shipped `envoy/envoy-full-duplex.yaml` (both bodies FULL_DUPLEX_STREAMED), and a
capture-only bootstrap derived from the first (`subset_bootstrap`) in which Envoy's
header_to_metadata filter turns a request header into the endpoint subset hint. Then it
sends one HTTP request per scenario through the right Envoy, waits for the processor to
write that stream's recording, applies the scenario's hand edit if it has one, and saves
it as `recordings/<scenario name>.json` with a description of what it shows and how it
was captured.

The replay test (`test_replay.py`) never runs this: it replays the saved files. Capture
again after changing the processor's answers on purpose, then read the diff.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from google.protobuf import json_format

from gateway_extproc.devtools import localstack
from gateway_extproc.devtools.localstack import LOCALHOST, ManagedProcess, ProcessGroup
from gateway_extproc.devtools.simulator.app import STREAM_PAUSE_HEADER, STREAM_PIECES_HEADER
from gateway_extproc.extproc import recorder as recordings
from gateway_extproc.proto_gen import recording_pb2 as rec
from tests.conformance import stack
from tests.conformance.stack import CHAT_MODEL, TERMINATING_MODEL, UNREADY_MODEL

# -- the capture-only bootstrap for the subset hint ----------------------------------

SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"
# The request header the capture's header_to_metadata rule reads; it carries the
# subset the way an upstream filter of a real deployment would put it in metadata.
SUBSET_HEADER = "x-gateway-destination-endpoint-subset"
EXT_PROC_FILTER = "envoy.filters.http.ext_proc"
HEADER_TO_METADATA_TYPE = (
    "type.googleapis.com/envoy.extensions.filters.http.header_to_metadata.v3.Config"
)


def buffered_bootstrap(base: Path = localstack.ENVOY_CONFIG) -> dict[str, Any]:
    """envoy/envoy.yaml in the one-filter shape (as Envoy Gateway sets it up): the whole
    exchange on one stream, so one recording holds it. The shipped two-filter shape
    splits it over a routing and an observer stream, which a recording of one stream
    cannot replay; its routing stream is this one without the response frames."""
    doc: dict[str, Any] = yaml.safe_load(base.read_text(encoding="utf-8"))
    return localstack.single_filter_shape(doc)


def subset_bootstrap(base: Path = localstack.ENVOY_CONFIG) -> dict[str, Any]:
    """`base` with header_to_metadata in front of ext_proc, turning the request header
    SUBSET_HEADER into dynamic metadata `envoy.lb.subset_hint` /
    `x-gateway-destination-endpoint-subset` (a comma-separated string), and ext_proc
    forwarding that namespace to the processor in each frame's metadata_context.

    Envoy only forwards the namespaces listed in `forwarding_namespaces`, so both halves
    are needed for the processor to see the hint.
    """
    doc = buffered_bootstrap(base)
    changed = 0
    for listener in doc["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for network_filter in chain["filters"]:
                http_filters = network_filter.get("typed_config", {}).get("http_filters")
                if not http_filters:
                    continue
                names = [f["name"] for f in http_filters]
                if EXT_PROC_FILTER not in names:
                    continue
                at = names.index(EXT_PROC_FILTER)
                ext_proc = http_filters[at]["typed_config"]
                options = ext_proc.setdefault("metadata_options", {})
                options["forwarding_namespaces"] = {"untyped": [SUBSET_NAMESPACE]}
                http_filters.insert(at, _header_to_metadata_filter())
                changed += 1
    if not changed:
        raise ValueError(f"{base}: no {EXT_PROC_FILTER} filter to put the subset hint before")
    return doc


def _header_to_metadata_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.header_to_metadata",
        "typed_config": {
            "@type": HEADER_TO_METADATA_TYPE,
            "request_rules": [
                {
                    "header": SUBSET_HEADER,
                    "on_header_present": {
                        "metadata_namespace": SUBSET_NAMESPACE,
                        "key": SUBSET_KEY,
                        "type": "STRING",
                    },
                    # Only the metadata reaches the processor, so a recording shows the
                    # processor reading the hint from metadata_context, not a header.
                    "remove": True,
                }
            ],
        },
    }


def validate_bootstrap(path: Path) -> None:
    """`envoy --mode validate`: raise with Envoy's own words when it refuses `path`."""
    result = localstack.validate_envoy_config(path)
    if result.returncode != 0:
        raise RuntimeError(f"envoy refuses {path}:\n{result.stdout}{result.stderr}")


def envoy_version() -> str:
    """`1.40.0` from `envoy --version` (the descriptions name the Envoy that spoke)."""
    out = subprocess.run(
        [localstack.find_envoy(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"/(\d+\.\d+\.\d+)/", out)
    return match.group(1) if match else out.strip()


# -- an HTTP client that can pause between pieces and hang up ------------------------
# Like tests/integration/stack.py's, plus what scenarios need: a fixed Host (stable
# frames), pauses between chunked pieces, and hanging up mid-response.

# Fixed so the recorded request frames are the same on every capture (`:authority`).
HOST_HEADER = "gateway.conformance"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass(frozen=True)
class Request:
    """One HTTP request as a scenario sends it.

    `body` bytes go with a Content-Length; `pieces` go chunked, `pause` seconds apart,
    so a FULL_DUPLEX_STREAMED Envoy forwards each as a frame of its own.
    `hang_up_after` closes the connection once that many response body bytes have
    arrived (a client that goes away mid-stream).
    """

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None
    pieces: tuple[bytes, ...] = ()
    pause: float = 0.05
    hang_up_after: int | None = None


def send(port: int, request: Request, timeout: float = 20.0) -> Reply:
    """Send `request` to 127.0.0.1:`port`; the body is written from a second thread
    while this one reads, as real clients do (Envoy may answer before the upload ends)."""
    lines = [f"{request.method} {request.path} HTTP/1.1", f"host: {HOST_HEADER}"]
    lines += [f"{name}: {value}" for name, value in request.headers.items()]
    if request.body is not None:
        lines.append(f"content-length: {len(request.body)}")
    elif request.pieces:
        lines.append("transfer-encoding: chunked")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()

    def upload(sock: socket.socket) -> None:
        try:
            sock.sendall(head)
            if request.body is not None:
                sock.sendall(request.body)
            elif request.pieces:
                for piece in request.pieces:
                    sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    time.sleep(request.pause)
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # Envoy answered early and closed; the reader gets the answer

    sock = socket.create_connection((LOCALHOST, port), timeout=timeout)
    try:
        uploader = threading.Thread(target=upload, args=(sock,), daemon=True)
        uploader.start()
        response = http.client.HTTPResponse(sock, method=request.method)
        response.begin()
        headers = {k.lower(): v for k, v in response.getheaders()}
        if request.hang_up_after is None:
            body = response.read()
        else:
            body = b""
            while len(body) < request.hang_up_after:
                more = response.read1(request.hang_up_after - len(body))
                if not more:
                    break
                body += more
        uploader.join(timeout)
        return Reply(response.status, headers, body)
    finally:
        sock.close()


# -- scenarios -----------------------------------------------------------------------

BUFFERED = "envoy.yaml"
FULL_DUPLEX = "envoy-full-duplex.yaml"
SUBSET = "envoy.yaml + subset hint"

# `{envoy}` is the version of the Envoy that ran the capture.
HOW_BUFFERED = (
    "Captured by tests/conformance/capture.py through real Envoy {envoy} running "
    "envoy/envoy.yaml in its one-filter shape, as Envoy Gateway sets it up (request body "
    "BUFFERED, response headers and STREAMED body on the same stream) in front of "
    "simulated engines."
)
HOW_FULL_DUPLEX = (
    "Captured by tests/conformance/capture.py through real Envoy {envoy} running "
    "envoy/envoy-full-duplex.yaml (both bodies FULL_DUPLEX_STREAMED, trailers SEND) in "
    "front of simulated engines. Body answers echo the frame's own bytes (generated ids "
    "and timestamps included), so they replay exactly: the replay sends the same frames."
)
HOW_SUBSET = (
    "Captured by tests/conformance/capture.py through real Envoy {envoy} running a "
    "capture-only bootstrap derived from envoy/envoy.yaml: Envoy's header_to_metadata "
    "filter, placed before ext_proc, turns the request header "
    "x-gateway-destination-endpoint-subset into dynamic metadata envoy.lb.subset_hint / "
    "x-gateway-destination-endpoint-subset (removing the header), and ext_proc forwards "
    "that namespace (metadata_options.forwarding_namespaces.untyped)."
)

# Envoy ends every ext_proc stream, finished or cut short, with a half-close followed at
# once by a reset (ExternalProcessorStreamImpl::close in Envoy's ext_proc client), so
# whether the processor sees the end of its request stream or a cancellation is a race,
# and the recorder's `ending` differs from one capture to the next. The capture sets it
# per scenario instead: HALF_CLOSE (the replay then also checks that the processor
# closes the stream cleanly with nothing more to say) except for the client cancel.
ENDING_NOTE = (
    "Ending {} set by the capture tool (Envoy half-closes and at once resets every "
    "ext_proc stream, so which the processor sees first is a race)."
)

Edit = Callable[[rec.Recording], None]


@dataclass(frozen=True)
class Scenario:
    name: str  # the recording's file name, without .json
    shows: str  # what the recording shows (the first part of its description)
    gateway: str  # BUFFERED, FULL_DUPLEX or SUBSET
    request: Request
    expect_status: int  # the HTTP status the client must see (0: hung up, not checked)
    edit: Edit | None = None
    edited: str = ""  # how the edit changed the captured recording, for the description
    # Set by the capture, not observed: see ENDING_NOTE.
    ending: rec.Recording.Ending = rec.Recording.HALF_CLOSE

    def description(self, envoy: str) -> str:
        how = {BUFFERED: HOW_BUFFERED, FULL_DUPLEX: HOW_FULL_DUPLEX, SUBSET: HOW_SUBSET}
        parts = [self.shows, how[self.gateway].format(envoy=envoy)]
        if self.edited:
            parts.append(self.edited)
        parts.append(ENDING_NOTE.format(rec.Recording.Ending.Name(self.ending)))
        return " ".join(parts)


def _json(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def _chat(model: str = CHAT_MODEL, **extra: Any) -> bytes:
    doc = {"model": model, "messages": [{"role": "user", "content": "Say hello."}]}
    return _json({**doc, "max_tokens": 4, **extra})


def _post(
    path: str, body: bytes | None = None, headers: dict[str, str] | None = None, **options: Any
) -> Request:
    return Request(
        "POST",
        path,
        {"content-type": "application/json", **(headers or {})},
        body=body,
        **options,
    )


CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def _step(frame: ext.ProcessingRequest, *expect: rec.Expectation) -> rec.Step:
    step = rec.Step()
    step.frame.Pack(frame)
    step.expect.extend(expect)
    return step


def _insert(recording: rec.Recording, at: int, step: rec.Step) -> None:
    """Put `step` at index `at` (0-based), moving the later steps along."""
    steps = list(recording.steps)
    steps.insert(at, step)
    del recording.steps[:]
    recording.steps.extend(steps)


def _index_of(recording: rec.Recording, kind: str, *, end_of_stream: bool) -> int:
    """The index of the first step whose frame is `kind` with that end_of_stream."""
    for index, step in enumerate(recording.steps):
        frame = recordings.frame_of(step)
        if frame.WhichOneof("request") == kind:
            message = getattr(frame, kind)
            if getattr(message, "end_of_stream", False) == end_of_stream:
                return index
    raise ValueError(f"the capture has no {kind} frame with end_of_stream={end_of_stream}")


def _request_body(body: bytes, end_of_stream: bool) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(request_body=ext.HttpBody(body=body, end_of_stream=end_of_stream))


def _response_body(body: bytes, end_of_stream: bool) -> ext.ProcessingRequest:
    return ext.ProcessingRequest(response_body=ext.HttpBody(body=body, end_of_stream=end_of_stream))


def _add_duplicate_end_of_stream(recording: rec.Recording) -> None:
    # Right after the request body's EndOfStream: a second body frame that ends the
    # stream again, while the response is still to come; then, after the response's
    # last frame, its EndOfStream once more. Both get the empty CONTINUE of their kind.
    body_end = _index_of(recording, "request_body", end_of_stream=True)
    again = recordings.frame_of(recording.steps[body_end])
    _insert(
        recording,
        body_end + 1,
        _step(again, rec.Expectation(kind="request_body", empty=True)),
    )
    recording.steps.append(
        _step(_response_body(b"", True), rec.Expectation(kind="response_body", empty=True))
    )


def _add_body_after_end_of_stream(recording: rec.Recording) -> None:
    # A request body chunk after the request's EndOfStream (before the response starts),
    # and a response body chunk after the response's EndOfStream: both are ignored and
    # answered with the empty CONTINUE; the response in between is followed as usual.
    body_end = _index_of(recording, "request_body", end_of_stream=True)
    late = _request_body(b'{"model": "cold-model"}', False)
    _insert(recording, body_end + 1, _step(late, rec.Expectation(kind="request_body", empty=True)))
    recording.steps.append(
        _step(
            _response_body(b'data: {"late": true}\n\n', False),
            rec.Expectation(kind="response_body", empty=True),
        )
    )


def _add_full_duplex_no_answers(recording: rec.Recording) -> None:
    # In FULL_DUPLEX_STREAMED the same late frames get no answer at all: the body was
    # already handed back, and an answer would make Envoy send bytes twice.
    body_end = _index_of(recording, "request_body", end_of_stream=True)
    _insert(recording, body_end + 1, _step(_request_body(b'{"late": 1}', False)))
    _insert(recording, body_end + 2, _step(_request_body(b"", True)))
    recording.steps.append(_step(_response_body(b'data: {"late": true}\n\n', False)))
    recording.steps.append(_step(_response_body(b"", True)))


def _pin_pod(address: str) -> Edit:
    """Tighten the routing expectations to `address`: the recorder writes "any pod of
    the model", which would pass even if the processor ignored the subset hint."""

    def edit(recording: rec.Recording) -> None:
        pinned = 0
        for step in recording.steps:
            for expect in step.expect:
                for match in expect.headers.values():
                    if match.WhichOneof("match") == "any_pod_of_model":
                        match.equals = address
                        pinned += 1
                lb = expect.dynamic_metadata.fields.get("envoy.lb")
                if lb is not None:
                    lb.struct_value.fields["x-gateway-destination-endpoint"].string_value = address
                    pinned += 1
        if pinned != 3:
            raise ValueError(f"expected two pod headers and the metadata, pinned {pinned}")

    return edit


def _pause(ms: int) -> dict[str, str]:
    return {STREAM_PAUSE_HEADER: str(ms)}


def scenarios() -> list[Scenario]:
    chat_pods = stack.pod_addresses(CHAT_MODEL)
    only = chat_pods[1]
    elsewhere = stack.pod_addresses(UNREADY_MODEL)[0]
    return [
        Scenario(
            "01-buffered-json-response",
            "A chat completion with a Content-Length body (one buffered request_body "
            "frame) routed to a pod of chat-model, and its JSON response (not streamed).",
            BUFFERED,
            _post(CHAT, _chat()),
            200,
        ),
        Scenario(
            "02-buffered-chunked-upload",
            "A completions request uploaded chunked (no Content-Length; Envoy drops the "
            "transfer-encoding header) in three pieces 50 ms apart; in BUFFERED mode "
            "Envoy collects them and sends one request_body frame with end_of_stream. "
            "JSON response.",
            BUFFERED,
            _post(
                COMPLETIONS,
                pieces=(
                    b'{"model": "chat-model", ',
                    b'"prompt": "Say hello.", ',
                    b'"max_tokens": 4}',
                ),
            ),
            200,
        ),
        Scenario(
            "03-sse-split-mid-event",
            "A streamed chat completion whose engine wrote the SSE body in 40-byte pieces "
            "30 ms apart (simulator request header x-simulator-stream-pieces), so the "
            "response_body frames Envoy forwarded cut events in the middle; each gets "
            "the empty CONTINUE.",
            BUFFERED,
            _post(
                CHAT,
                _chat(stream=True, max_tokens=3),
                {STREAM_PIECES_HEADER: "40", **_pause(30)},
            ),
            200,
        ),
        Scenario(
            "04-sse-usage-and-done-in-one-chunk",
            "A streamed chat completion with stream_options.include_usage; the engine "
            "paused 30 ms after each write (simulator request header "
            "x-simulator-stream-pause-ms) and wrote the usage event and data: [DONE] in "
            "one write, so one response_body frame carries both.",
            BUFFERED,
            _post(CHAT, _chat(stream=True, stream_options={"include_usage": True}), _pause(30)),
            200,
        ),
        Scenario(
            "05-client-cancel",
            "A streamed chat completion (200 tokens, one every 50 ms) whose client closed "
            "the connection after the first 64 bytes of the response: Envoy ends the "
            "ext_proc stream after the first response_body frame, long before the "
            "response's EndOfStream, and the replay cancels the stream there.",
            BUFFERED,
            _post(CHAT, _chat(stream=True, max_tokens=200), _pause(50), hang_up_after=64),
            0,
            ending=rec.Recording.CANCEL,
        ),
        Scenario(
            "06-rejected-404-unknown-model",
            "A chat completion naming a model the dictionary does not have: an "
            "ImmediateResponse 404 model_not_found.",
            BUFFERED,
            _post(CHAT, _chat("no-such-model")),
            404,
        ),
        Scenario(
            "07-rejected-503-model-terminating",
            "A chat completion for retiring-model, whose every pod is being deleted: an "
            "ImmediateResponse 503 model_terminating with retry-after.",
            BUFFERED,
            _post(CHAT, _chat(TERMINATING_MODEL)),
            503,
        ),
        Scenario(
            "08-rejected-503-no-ready-pods",
            "A chat completion for cold-model, whose only pod is not ready: an "
            "ImmediateResponse 503 no_ready_pods with retry-after.",
            BUFFERED,
            _post(CHAT, _chat(UNREADY_MODEL)),
            503,
        ),
        Scenario(
            "09-rejected-400-body-not-json",
            "A chat completion whose body is not JSON (cut short): an ImmediateResponse "
            "400 invalid_request_body.",
            BUFFERED,
            _post(CHAT, b'{"model": "chat-model", "messages": ['),
            400,
        ),
        Scenario(
            "10-models-list",
            "GET /v1/models (headers only): the processor answers it itself with an "
            "ImmediateResponse 200 listing the ready models.",
            BUFFERED,
            Request("GET", "/v1/models"),
            200,
        ),
        Scenario(
            "11-header-only-routed-by-model-header",
            "A request without a body (request_headers end_of_stream) naming its model "
            "in the x-gateway-model-name header: routed on the headers alone (a HEAD of "
            "an inference path: only those are routed); the engine's answer, a 405 with "
            "no body, ends the response on its headers.",
            BUFFERED,
            Request("HEAD", CHAT, {"x-gateway-model-name": CHAT_MODEL}),
            405,
        ),
        Scenario(
            "12-header-only-without-model",
            "A POST with an empty body and no model header (request_headers "
            "end_of_stream): nothing names a model, an ImmediateResponse 400 "
            "model_required on the headers.",
            BUFFERED,
            _post(CHAT, b""),
            400,
        ),
        Scenario(
            "13-subset-hint",
            f"A chat completion whose frames carry the endpoint subset hint {only} (one "
            "of chat-model's two pods) in metadata_context: the processor picks inside "
            "it. (A processor that ignored the hint would still pick this pod half the "
            "time; 14-subset-hint-outside-model catches that every time.)",
            SUBSET,
            _post(CHAT, _chat(), {SUBSET_HEADER: only}),
            200,
            edit=_pin_pod(only),
            edited="Captured, then the routing expectations of step 2 (both pod headers "
            f"and the envoy.lb metadata) tightened by hand from anyPodOfModel to {only}.",
        ),
        Scenario(
            "14-subset-hint-outside-model",
            f"A chat completion whose subset hint names only {elsewhere}, a pod that does "
            "not serve chat-model: an ImmediateResponse 503 no_ready_pods.",
            SUBSET,
            _post(CHAT, _chat(), {SUBSET_HEADER: elsewhere}),
            503,
        ),
        Scenario(
            "15-full-duplex-json",
            "A chat completion with a Content-Length body in FULL_DUPLEX_STREAMED: no "
            "answer to the request headers or the body's data frame; on the body's "
            "EndOfStream (an empty frame) the routing headers and the whole body come "
            "back; the JSON response body is echoed frame by frame.",
            FULL_DUPLEX,
            _post(CHAT, _chat()),
            200,
        ),
        Scenario(
            "16-full-duplex-chunked-upload-sse",
            "A streamed chat completion uploaded chunked in three pieces 50 ms apart in "
            "FULL_DUPLEX_STREAMED: three request_body frames with no answer, then on the "
            "EndOfStream the routing headers and the whole body; every SSE response "
            "frame (one event each, 30 ms apart) echoed back.",
            FULL_DUPLEX,
            _post(
                CHAT,
                pieces=(
                    b'{"model": "chat-model", "stream": true, ',
                    b'"messages": [{"role": "user", "content": "Say hello."}], ',
                    b'"max_tokens": 3}',
                ),
                headers=_pause(30),
            ),
            200,
        ),
        Scenario(
            "17-full-duplex-rejected-404",
            "A chat completion naming an unknown model in FULL_DUPLEX_STREAMED: nothing "
            "is answered until the body's EndOfStream, which gets the ImmediateResponse "
            "404 model_not_found.",
            FULL_DUPLEX,
            _post(CHAT, _chat("no-such-model")),
            404,
        ),
        Scenario(
            "18-duplicate-end-of-stream",
            "A buffered chat completion and its JSON response, with a request body frame "
            "that repeats the EndOfStream and a second response EndOfStream: each is a "
            "no-op answered by the empty CONTINUE of its kind.",
            BUFFERED,
            _post(CHAT, _chat()),
            200,
            edit=_add_duplicate_end_of_stream,
            edited="Captured, then step 3 (the request body frame again, end_of_stream "
            "true) and the last step (an empty response_body with end_of_stream) added by "
            "hand: real Envoy never sends a second EndOfStream.",
        ),
        Scenario(
            "19-body-after-end-of-stream",
            "A streamed chat completion with a request body chunk (naming another model) "
            "after the request's EndOfStream and a response body chunk after the "
            "response's: both no-ops answered by the empty CONTINUE, with no effect on "
            "the routing or on the response in between.",
            BUFFERED,
            _post(CHAT, _chat(stream=True, max_tokens=2)),
            200,
            edit=_add_body_after_end_of_stream,
            edited="Captured, then step 3 (a request_body chunk) and the last step (a "
            "response_body chunk) added by hand: real Envoy sends nothing after "
            "EndOfStream in BUFFERED/STREAMED mode.",
        ),
        Scenario(
            "20-full-duplex-body-after-end-of-stream",
            "The FULL_DUPLEX_STREAMED version of the late frames: body frames after each "
            "direction's EndOfStream (data, then a repeated EndOfStream) get no answer "
            "at all (steps with no expectation).",
            FULL_DUPLEX,
            _post(CHAT, _chat(stream=True, max_tokens=2), _pause(30)),
            200,
            edit=_add_full_duplex_no_answers,
            edited="Captured, then two request_body frames after the request's "
            "EndOfStream and two response_body frames after the response's added by "
            "hand, each expecting no answer.",
        ),
        Scenario(
            "21-upstream-error-passes-through",
            "A chat completion that the engine refuses (max_tokens beyond its context "
            "length): the processor routes it, and the engine's own 400 passes through "
            "the response frames untouched (empty CONTINUEs).",
            BUFFERED,
            _post(CHAT, _chat(max_tokens=10_000_000)),
            400,
        ),
        Scenario(
            "22-model-retrieve",
            "GET /v1/models/chat-model (headers only): the processor answers it itself "
            "with an ImmediateResponse 200, the model object the list holds.",
            BUFFERED,
            Request("GET", f"/v1/models/{CHAT_MODEL}"),
            200,
        ),
        Scenario(
            "23-model-retrieve-unknown-404",
            "GET /v1/models/<a model nobody serves> (headers only): an ImmediateResponse "
            "404 model_not_found, as OpenAI answers.",
            BUFFERED,
            Request("GET", "/v1/models/no-such-model"),
            404,
        ),
    ]


# -- running the capture -------------------------------------------------------------

SIMULATOR_ARGS = ("--ttft-ms", "5", "--itl-ms", "20", "--seed", "0")
RECORDING_DEADLINE = 15.0


def _wait_for_recording(record_dir: Path, before: set[Path]) -> Path:
    """The one recording the processor wrote since `before`, once it is complete."""
    deadline = time.monotonic() + RECORDING_DEADLINE
    while time.monotonic() < deadline:
        new = sorted(set(record_dir.glob("*.json")) - before)
        if len(new) > 1:
            raise RuntimeError(f"one request made {len(new)} ext_proc streams: {new}")
        if new:
            try:
                recordings.load(new[0])
            except (OSError, ValueError, json_format.ParseError):
                # Written in place, not renamed: it may be only half there yet.
                pass
            else:
                return new[0]
        time.sleep(0.05)
    raise RuntimeError(f"the processor wrote no recording within {RECORDING_DEADLINE:.0f}s")


def capture(names: Iterable[str], log_dir: Path) -> list[Path]:
    chosen = [s for s in scenarios() if not names or s.name in names]
    unknown = set(names) - {s.name for s in scenarios()}
    if unknown:
        raise SystemExit(f"no scenario named {', '.join(sorted(unknown))}")
    record_dir = log_dir / "recorded"
    buffered_config = log_dir / "envoy-buffered.yaml"
    buffered_config.write_text(yaml.safe_dump(buffered_bootstrap(), sort_keys=False))
    validate_bootstrap(buffered_config)
    subset_config = log_dir / "envoy-subset-hint.yaml"
    subset_config.write_text(yaml.safe_dump(subset_bootstrap(), sort_keys=False))
    validate_bootstrap(subset_config)
    envoy = envoy_version()
    env = localstack.environment_without_gateway_settings()
    ready_pods = stack.pod_addresses(CHAT_MODEL)
    ports = [int(address.rpartition(":")[2]) for address in ready_pods]
    localstack.ensure_ports_free((f"simulated pod {p}", p) for p in ports)
    written: list[Path] = []
    with ProcessGroup() as group:
        for port in ports:
            group.add(
                localstack.start_simulator(
                    port, [CHAT_MODEL], log_dir, extra_args=SIMULATOR_ARGS, env=env
                )
            )
        grpc_port, admin_port = localstack.free_port(), localstack.free_port()
        group.add(
            stack.start_processor(log_dir, grpc_port, admin_port, ("--record-dir", str(record_dir)))
        )
        envoys: dict[str, tuple[ManagedProcess, int]] = {}
        configs = {
            BUFFERED: buffered_config,
            FULL_DUPLEX: localstack.ENVOY_FULL_DUPLEX_CONFIG,
            SUBSET: subset_config,
        }
        for kind, config in configs.items():
            port, envoy_admin = localstack.free_port(), localstack.free_port()
            process = localstack.start_envoy(
                config,
                log_dir,
                listen_port=port,
                admin_port=envoy_admin,
                extproc_port=grpc_port,
                concurrency=1,
                name=f"envoy-{config.stem}",
            )
            envoys[kind] = (group.add(process), port)
        localstack.wait_ready(group, timeout=30.0)
        record_dir.mkdir(parents=True, exist_ok=True)
        stack.RECORDINGS.mkdir(exist_ok=True)
        for scenario in chosen:
            before = set(record_dir.glob("*.json"))
            _, port = envoys[scenario.gateway]
            # A fixed request id (Envoy keeps a client's id from an internal address) makes
            # the frames, and the engine's response ids, the same on every capture.
            request_id = {"x-request-id": f"conformance-{scenario.name}"}
            request = dataclasses.replace(
                scenario.request, headers={**scenario.request.headers, **request_id}
            )
            reply = send(port, request)
            if scenario.expect_status and reply.status != scenario.expect_status:
                raise RuntimeError(
                    f"{scenario.name}: HTTP {reply.status}, expected "
                    f"{scenario.expect_status}: {reply.body[:300]!r}"
                )
            recording = recordings.load(_wait_for_recording(record_dir, before))
            if scenario.edit is not None:
                scenario.edit(recording)
            # The file name names it in replay reports; an empty name keeps it so after
            # someone renames the file.
            recording.name = ""
            recording.description = scenario.description(envoy)
            recording.ending = scenario.ending
            target = stack.RECORDINGS / f"{scenario.name}.json"
            recordings.save(recording, target)
            written.append(target)
            ending = rec.Recording.Ending.Name(recording.ending)
            print(
                f"{target.name}: HTTP {reply.status}, {len(recording.steps)} steps, ends {ending}"
            )
    stale = sorted(
        p.name
        for p in stack.RECORDINGS.glob("*.json")
        if p.stem not in {s.name for s in scenarios()}
    )
    if stale:
        print(f"not produced by any scenario (left alone): {', '.join(stale)}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.conformance.capture", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--only", nargs="+", default=[], metavar="NAME", help="scenarios to capture"
    )
    parser.add_argument(
        "--keep-logs", action="store_true", help="keep the processes' logs and raw recordings"
    )
    args = parser.parse_args(argv)
    log_dir = Path(tempfile.mkdtemp(prefix="conformance-capture-"))
    try:
        capture(args.only, log_dir)
    except (localstack.StartupError, RuntimeError) as exc:
        print(f"capture: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep_logs:
            print(f"logs and raw recordings: {log_dir}")
        else:
            import shutil

            shutil.rmtree(log_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
