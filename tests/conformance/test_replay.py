"""Recorded-frame conformance: every recording in tests/conformance/recordings replays
against a freshly started processor, and the recordings cover the cases that matter.

The recordings are real Envoy traffic captured by `python -m tests.conformance.capture`
(see docs/CONFORMANCE.md). Here nothing but the processor runs: the replay speaks
ext_proc to it directly, frame by frame, and compares each answer with the recording.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import orjson
import pytest
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext

from gateway_extproc.conformance.replay import ReplayResult, replay_paths
from gateway_extproc.devtools import localstack
from gateway_extproc.extproc import recorder as recordings
from gateway_extproc.proto_gen import recording_pb2 as rec
from tests.conformance import stack
from tests.conformance.conftest import Target

Mode = processing_mode_pb2.ProcessingMode
SUBSET_NAMESPACE = "envoy.lb.subset_hint"
SUBSET_KEY = "x-gateway-destination-endpoint-subset"


def replay(paths: list[Path], target: Target) -> list[ReplayResult]:
    # A short wait per answer: a local processor answers in milliseconds, and the
    # broken recording that expects an answer to a no-op waits it out once.
    return asyncio.run(
        replay_paths(paths, target.address, str(stack.MODELS_FILE), answer_timeout=1.0)
    )


def recording_files() -> list[Path]:
    return sorted(stack.RECORDINGS.glob("*.json"))


# -- all recordings pass ----------------------------------------------------------------


def test_every_recording_replays_and_passes(target: Target) -> None:
    results = replay([stack.RECORDINGS], target)
    failed = [result.line() for result in results if not result.passed]
    assert not failed, "\n".join(failed) + f"\n--- processor log ---\n{target.process.log_tail()}"
    assert sorted(r.name for r in results) == [p.stem for p in recording_files()]


def test_the_cli_replays_the_directory(target: Target) -> None:
    # As a user runs it from a checkout: relative paths, the console entry point's module.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway_extproc.cli",
            "replay",
            "tests/conformance/recordings",
            "--target",
            target.address,
            "--models-file",
            "tests/conformance/models.yaml",
        ],
        cwd=localstack.REPO_ROOT,
        env=localstack.environment_without_gateway_settings(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    count = len(recording_files())
    assert lines[-1] == f"{count} passed, 0 failed"
    assert sorted(lines[:-1]) == [f"PASS {p.stem}" for p in recording_files()]


def test_the_example_in_the_docs_replays_and_passes(target: Target, tmp_path: Path) -> None:
    text = (localstack.REPO_ROOT / "docs" / "CONFORMANCE.md").read_text(encoding="utf-8")
    example = text.split("```json\n", 1)[1].split("```", 1)[0]
    path = tmp_path / "docs-example.json"
    path.write_text(example, encoding="utf-8")
    (result,) = replay([path], target)
    assert result.passed, result.detail


def test_every_recording_says_what_it_shows_and_how_it_was_captured() -> None:
    for path in recording_files():
        recording = recordings.load(path)
        assert "Captured by tests/conformance/capture.py" in recording.description, path.name
        edited = "by hand" in recording.description
        # A hand-edited recording says which steps; the hand-added steps are the point.
        assert not edited or "Captured, then" in recording.description, path.name


# -- a broken recording fails, naming the first difference -----------------------------


@dataclass(frozen=True)
class Breakage:
    file: str
    change: Callable[[rec.Recording], None]
    detail: str  # the replay's first-difference report


def _expect(recording: rec.Recording, step: int, answer: int = 1) -> rec.Expectation:
    """1-based, as the replay reports them."""
    return recording.steps[step - 1].expect[answer - 1]


def _set_status(recording: rec.Recording) -> None:
    _expect(recording, 2).status = 502


def _set_error_code(recording: rec.Recording) -> None:
    _expect(recording, 2).error_code = "model_terminating"


def _pin_other_pod(recording: rec.Recording) -> None:
    _expect(recording, 2).headers["target-pod"].equals = stack.pod_addresses("chat-model")[0]


def _alter_echo(recording: rec.Recording) -> None:
    _expect(recording, 5).body_text = '{"id": "something else"}'


def _drop_request_body_echo(recording: rec.Recording) -> None:
    del recording.steps[2].expect[1]


def _forget_the_no_op_answer(recording: rec.Recording) -> None:
    del recording.steps[2].expect[:]


def _expect_an_answer_to_a_no_op(recording: rec.Recording) -> None:
    recording.steps[3].expect.append(rec.Expectation(kind="request_body", empty=True))


BREAKAGES = {
    "status": Breakage(
        "07-rejected-503-model-terminating",
        _set_status,
        "step 2 answer 1: expected status 502, got 503",
    ),
    "error-code": Breakage(
        "08-rejected-503-no-ready-pods",
        _set_error_code,
        "step 2 answer 1: expected error code 'model_terminating', got 'no_ready_pods'",
    ),
    "pinned-pod": Breakage(
        "13-subset-hint",
        _pin_other_pod,
        "step 2 answer 1: header target-pod: expected '127.0.0.1:28101', got '127.0.0.1:28102'",
    ),
    "echoed-body": Breakage(
        "15-full-duplex-json",
        _alter_echo,
        'step 5 answer 1: body differs: expected \'{"id": "something else"}\', got '
        '\'{"id":"chatcmpl-conformance-15-full-duplex-json","object":"chat.completion","cre\'',
    ),
    "missing-answer": Breakage(
        "15-full-duplex-json",
        _drop_request_body_echo,
        "step 4 answer 1: expected a response_headers answer, got request_body",
    ),
    "no-op-answered": Breakage(
        "19-body-after-end-of-stream",
        _forget_the_no_op_answer,
        "step 4 answer 1: expected a response_headers answer, got request_body",
    ),
    "no-answer-expected": Breakage(
        "20-full-duplex-body-after-end-of-stream",
        _expect_an_answer_to_a_no_op,
        "step 4 answer 1: no answer in time",
    ),
}


@pytest.mark.parametrize("breakage", BREAKAGES.values(), ids=BREAKAGES.keys())
def test_an_edited_recording_fails_with_its_first_difference(
    breakage: Breakage, target: Target, tmp_path: Path
) -> None:
    recording = recordings.load(stack.RECORDINGS / f"{breakage.file}.json")
    breakage.change(recording)
    broken = tmp_path / f"{breakage.file}.json"
    recordings.save(recording, broken)
    (result,) = replay([broken], target)
    assert not result.passed
    assert result.detail == breakage.detail


# -- the recordings cover the required cases -------------------------------------------


def _steps(recording: rec.Recording) -> list[tuple[ext.ProcessingRequest, list[rec.Expectation]]]:
    return [(recordings.frame_of(step), list(step.expect)) for step in recording.steps]


def _kind(frame: ext.ProcessingRequest) -> str:
    return frame.WhichOneof("request") or ""


def _headers(message: ext.HttpHeaders) -> dict[str, str]:
    return {
        h.key: (h.raw_value.decode() if h.raw_value else h.value) for h in message.headers.headers
    }


def _request_headers(recording: rec.Recording) -> dict[str, str]:
    return _headers(recordings.frame_of(recording.steps[0]).request_headers)


def _response_headers(recording: rec.Recording) -> dict[str, str]:
    for frame, _ in _steps(recording):
        if _kind(frame) == "response_headers":
            return _headers(frame.response_headers)
    return {}


def _modes(recording: rec.Recording) -> tuple[int, int]:
    config = recordings.frame_of(recording.steps[0]).protocol_config
    return config.request_body_mode, config.response_body_mode


def _bodies(
    recording: rec.Recording, kind: str
) -> list[tuple[ext.HttpBody, list[rec.Expectation]]]:
    return [(getattr(f, kind), e) for f, e in _steps(recording) if _kind(f) == kind]


def _late(recording: rec.Recording, kind: str) -> list[list[rec.Expectation]]:
    """The expectations of `kind` body frames that come after that body's EndOfStream."""
    ended = False
    late = []
    for body, expect in _bodies(recording, kind):
        if ended:
            late.append(expect)
        ended = ended or body.end_of_stream
    return late


def _immediate(recording: rec.Recording) -> tuple[int, str]:
    expect = recording.steps[-1].expect[-1]
    assert expect.kind == "immediate_response", "the last answer is not an ImmediateResponse"
    return expect.status, expect.error_code


def _routed(expect: rec.Expectation) -> bool:
    return expect.clear_route_cache and "x-gateway-destination-endpoint" in expect.headers


def check_buffered_body(r: rec.Recording) -> None:
    assert _modes(r) == (Mode.BUFFERED, Mode.STREAMED)
    assert "content-length" in _request_headers(r)
    ((body, expect),) = _bodies(r, "request_body")
    assert body.end_of_stream and _routed(expect[0])


def check_buffered_chunked_body(r: rec.Recording) -> None:
    assert _modes(r)[0] == Mode.BUFFERED
    assert "content-length" not in _request_headers(r)  # sent chunked
    ((body, expect),) = _bodies(r, "request_body")  # Envoy buffered the pieces into one
    assert body.end_of_stream and orjson.loads(body.body)["model"] and _routed(expect[0])


def check_full_duplex_chunked_body(r: rec.Recording) -> None:
    assert _modes(r)[0] == Mode.FULL_DUPLEX_STREAMED
    bodies = _bodies(r, "request_body")
    pieces = [body.body for body, _ in bodies if body.body]
    assert len(pieces) >= 3, "the upload should reach the processor in several frames"
    assert all(not expect for _, expect in bodies[:-1]), "answered before the body was whole"
    headers, echo = bodies[-1][1]
    assert _routed(headers) and echo.body_text == b"".join(pieces).decode()


def check_json_response(r: rec.Recording) -> None:
    assert _response_headers(r)["content-type"] == "application/json"
    body = b"".join(b.body for b, _ in _bodies(r, "response_body"))
    assert "choices" in orjson.loads(body)


def check_sse_split_mid_event(r: rec.Recording) -> None:
    assert _response_headers(r)["content-type"] == "text/event-stream"
    chunks = [b.body for b, _ in _bodies(r, "response_body") if b.body]
    assert len(chunks) > 2
    assert any(not c.endswith(b"\n\n") for c in chunks[:-1]), "no chunk ends mid-event"
    assert any(not c.startswith(b"data: ") for c in chunks), "no chunk starts mid-event"


def check_usage_and_done_together(r: rec.Recording) -> None:
    chunks = [b.body for b, _ in _bodies(r, "response_body")]
    assert any(b'"usage"' in c and b"data: [DONE]" in c for c in chunks)


def check_duplicate_end_of_stream(r: rec.Recording) -> None:
    for kind in ("request_body", "response_body"):
        ends = [expect for body, expect in _bodies(r, kind) if body.end_of_stream]
        assert len(ends) == 2, f"{kind}: expected a repeated EndOfStream"
        assert [e.kind for e in ends[1]] == [kind] and ends[1][0].empty


def check_body_after_end_of_stream(r: rec.Recording) -> None:
    assert _modes(r) == (Mode.BUFFERED, Mode.STREAMED)
    for kind in ("request_body", "response_body"):
        late = _late(r, kind)
        assert late, f"no {kind} frame after its EndOfStream"
        assert all([e.kind for e in x] == [kind] and x[0].empty for x in late)


def check_no_answer_after_end_of_stream(r: rec.Recording) -> None:
    assert _modes(r) == (Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
    for kind in ("request_body", "response_body"):
        late = _late(r, kind)
        assert late and all(not expect for expect in late), kind


def check_client_cancel(r: rec.Recording) -> None:
    assert r.ending == rec.Recording.CANCEL
    bodies = _bodies(r, "response_body")
    assert bodies and not any(body.end_of_stream for body, _ in bodies)


def check_rejected(status: int, code: str) -> Callable[[rec.Recording], None]:
    def check(r: rec.Recording) -> None:
        assert _immediate(r) == (status, code)

    return check


def check_models_list(r: rec.Recording) -> None:
    headers = _request_headers(r)
    assert (headers[":method"], headers[":path"]) == ("GET", "/v1/models")
    assert _immediate(r) == (200, "")


def check_model_retrieve(model: str, status: int, code: str) -> Callable[[rec.Recording], None]:
    def check(r: rec.Recording) -> None:
        headers = _request_headers(r)
        assert (headers[":method"], headers[":path"]) == ("GET", f"/v1/models/{model}")
        assert _immediate(r) == (status, code)

    return check


def check_header_only(r: rec.Recording) -> None:
    first = recordings.frame_of(r.steps[0])
    assert first.request_headers.end_of_stream
    assert not _bodies(r, "request_body")
    assert _routed(r.steps[0].expect[0])


def check_subset_hint(r: rec.Recording) -> None:
    first = recordings.frame_of(r.steps[0])
    hint = first.metadata_context.filter_metadata[SUBSET_NAMESPACE].fields[SUBSET_KEY]
    assert hint.string_value in stack.pod_addresses("chat-model")
    routed = [e for _, expect in _steps(r) for e in expect if _routed(e)]
    assert routed and routed[0].headers["target-pod"].equals == hint.string_value


def check_subset_outside_model(r: rec.Recording) -> None:
    first = recordings.frame_of(r.steps[0])
    assert SUBSET_NAMESPACE in first.metadata_context.filter_metadata
    assert _immediate(r) == (503, "no_ready_pods")


def check_full_duplex_both_ways(content_type: str) -> Callable[[rec.Recording], None]:
    def check(r: rec.Recording) -> None:
        assert _modes(r) == (Mode.FULL_DUPLEX_STREAMED, Mode.FULL_DUPLEX_STREAMED)
        assert _response_headers(r)["content-type"] == content_type
        echoes = [e for _, x in _steps(r) for e in x if e.kind == "request_body"]
        assert echoes and all(e.HasField("body_text") for e in echoes)
        for body, expect in _bodies(r, "response_body"):
            (echo,) = expect
            assert echo.body_text == body.body.decode()
            assert echo.end_of_stream == body.end_of_stream

    return check


# The cases the issue asks the recordings to cover: what each is, in which file, and
# what that file must show for it (so a re-capture that loses the point fails here).
CASES: dict[str, tuple[str, Callable[[rec.Recording], None]]] = {
    "buffered-request-body": ("01-buffered-json-response", check_buffered_body),
    "chunked-request-body-buffered": ("02-buffered-chunked-upload", check_buffered_chunked_body),
    "chunked-request-body-full-duplex": (
        "16-full-duplex-chunked-upload-sse",
        check_full_duplex_chunked_body,
    ),
    "json-response": ("01-buffered-json-response", check_json_response),
    "sse-split-mid-event": ("03-sse-split-mid-event", check_sse_split_mid_event),
    "usage-and-done-in-one-chunk": (
        "04-sse-usage-and-done-in-one-chunk",
        check_usage_and_done_together,
    ),
    "duplicate-end-of-stream": ("18-duplicate-end-of-stream", check_duplicate_end_of_stream),
    "body-after-end-of-stream": ("19-body-after-end-of-stream", check_body_after_end_of_stream),
    "full-duplex-no-answer-after-end-of-stream": (
        "20-full-duplex-body-after-end-of-stream",
        check_no_answer_after_end_of_stream,
    ),
    "client-cancel": ("05-client-cancel", check_client_cancel),
    "404-unknown-model": ("06-rejected-404-unknown-model", check_rejected(404, "model_not_found")),
    "503-terminating": (
        "07-rejected-503-model-terminating",
        check_rejected(503, "model_terminating"),
    ),
    "503-no-ready-pod": ("08-rejected-503-no-ready-pods", check_rejected(503, "no_ready_pods")),
    "400-bad-body": (
        "09-rejected-400-body-not-json",
        check_rejected(400, "invalid_request_body"),
    ),
    "get-models": ("10-models-list", check_models_list),
    "get-model": ("22-model-retrieve", check_model_retrieve(stack.CHAT_MODEL, 200, "")),
    "get-unknown-model": (
        "23-model-retrieve-unknown-404",
        check_model_retrieve("no-such-model", 404, "model_not_found"),
    ),
    "header-only-request": ("11-header-only-routed-by-model-header", check_header_only),
    "subset-hint": ("13-subset-hint", check_subset_hint),
    "subset-hint-outside-model": ("14-subset-hint-outside-model", check_subset_outside_model),
    "full-duplex-json": ("15-full-duplex-json", check_full_duplex_both_ways("application/json")),
    "full-duplex-sse": (
        "16-full-duplex-chunked-upload-sse",
        check_full_duplex_both_ways("text/event-stream"),
    ),
}


@pytest.mark.parametrize("case", CASES.keys())
def test_the_recordings_cover_the_case(case: str) -> None:
    name, check = CASES[case]
    path = stack.RECORDINGS / f"{name}.json"
    assert path.is_file(), f"{case}: {path} is missing"
    check(recordings.load(path))
