"""Replay recordings against any ext_proc server and report the first difference.

Usable from the command line (`gateway-extproc replay`) and as a library call in pytest
(`replay_paths`). Each recording is one gRPC stream: every frame is sent in order and,
after each, exactly the expected number of answers is read and compared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc
from google.protobuf import json_format, struct_pb2

from gateway_extproc.extproc import recorder as recordings
from gateway_extproc.proto_gen import recording_pb2 as rec

ANSWER_TIMEOUT = 5.0  # seconds to wait for each expected answer


@dataclass(frozen=True, slots=True)
class ReplayResult:
    name: str
    passed: bool
    detail: str = ""  # the first difference, when not passed

    def line(self) -> str:
        return f"PASS {self.name}" if self.passed else f"FAIL {self.name}: {self.detail}"


def recording_files(paths: Iterable[str | Path]) -> list[Path]:
    """The recording files named, directories expanded to their *.json, sorted."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(path.glob("*.json")))
        else:
            files.append(path)
    return files


def pods_by_model(models_file: str | None) -> dict[str, set[str]] | None:
    """Pod addresses per model from a static model file; None means "any ip:port"."""
    if not models_file:
        return None
    from gateway_extproc.models.static import parse_models_file

    pods: dict[str, set[str]] = {}
    for pod in parse_models_file(Path(models_file).read_text(encoding="utf-8")):
        for model in pod.models:
            pods.setdefault(model, set()).add(pod.address)
    return pods


async def replay_one(
    channel: grpc.aio.Channel,
    recording: rec.Recording,
    pods: Mapping[str, set[str]] | None,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> ReplayResult:
    stub = ext_grpc.ExternalProcessorStub(channel)
    call = stub.Process()
    try:
        for index, step in enumerate(recording.steps):
            await call.write(recordings.frame_of(step))
            for n, expect in enumerate(step.expect):
                where = f"step {index + 1} answer {n + 1}"
                try:
                    answer = await _next_answer(call, answer_timeout)
                except TimeoutError:
                    return ReplayResult(recording.name, False, f"{where}: no answer in time")
                if answer is grpc.aio.EOF:
                    return ReplayResult(recording.name, False, f"{where}: the stream ended")
                difference = compare(expect, answer, pods)
                if difference:
                    return ReplayResult(recording.name, False, f"{where}: {difference}")
        if recording.ending == rec.Recording.CANCEL:
            call.cancel()
            return ReplayResult(recording.name, True)
        await call.done_writing()
        extra = await asyncio.wait_for(call.read(), answer_timeout)
        if extra is not grpc.aio.EOF:
            kind = extra.WhichOneof("response")
            return ReplayResult(recording.name, False, f"an answer nobody expected: {kind}")
        code = await call.code()
        if code != grpc.StatusCode.OK:
            return ReplayResult(recording.name, False, f"the stream ended with {code.name}")
        return ReplayResult(recording.name, True)
    except grpc.aio.AioRpcError as exc:
        return ReplayResult(recording.name, False, f"gRPC error {exc.code().name}: {exc.details()}")
    finally:
        call.cancel()


async def _next_answer(call: grpc.aio.StreamStreamCall, timeout: float) -> object:
    """The next answer within `timeout`, past any request to extend Envoy's message
    timeout: a held request's notice, sent before its answer and not an answer to any
    frame. As Envoy does, the replay then waits as long as the notice asks."""
    while True:
        answer = await asyncio.wait_for(call.read(), timeout)
        if answer is grpc.aio.EOF or not _is_timeout_notice(answer):
            return answer
        timeout = max(timeout, answer.override_message_timeout.ToTimedelta().total_seconds())


def _is_timeout_notice(answer: ext.ProcessingResponse) -> bool:
    return answer.HasField("override_message_timeout") and answer.WhichOneof("response") is None


def compare(
    expect: rec.Expectation, answer: ext.ProcessingResponse, pods: Mapping[str, set[str]] | None
) -> str:
    """The first way `answer` differs from `expect`, or "" when it matches."""
    kind = answer.WhichOneof("response") or ""
    if kind != expect.kind:
        return f"expected a {expect.kind} answer, got {kind or 'an empty one'}"
    if kind == "immediate_response":
        immediate = answer.immediate_response
        if immediate.status.code != expect.status:
            return f"expected status {expect.status}, got {immediate.status.code}"
        code = recordings.error_code_of(immediate.body)
        if code != expect.error_code:
            return f"expected error code {expect.error_code!r}, got {code!r}"
        mutation = immediate.headers
    else:
        phase = getattr(answer, kind)
        if expect.empty and (phase.ByteSize() != 0 or answer.HasField("dynamic_metadata")):
            return "expected the empty CONTINUE, got mutations"
        common = phase.response
        if common.clear_route_cache != expect.clear_route_cache:
            return f"expected clear_route_cache={expect.clear_route_cache}"
        mutation = common.header_mutation
        if expect.HasField("body_text"):
            body = common.body_mutation
            got = (
                body.streamed_response.body if body.HasField("streamed_response") else body.body
            ).decode("utf-8", "replace")
            if got != expect.body_text:
                return f"body differs: expected {expect.body_text[:80]!r}, got {got[:80]!r}"
            if body.streamed_response.end_of_stream != expect.end_of_stream:
                return f"expected end_of_stream={expect.end_of_stream}"
    got_headers = {
        o.header.key: (o.header.raw_value.decode("utf-8", "replace") or o.header.value)
        for o in mutation.set_headers
    }
    for name, match in expect.headers.items():
        if name not in got_headers:
            return f"header {name} was not set"
        problem = _value_problem(match, got_headers[name], pods)
        if problem:
            return f"header {name}: {problem}"
    if expect.HasField("dynamic_metadata"):
        return _metadata_problem(expect.dynamic_metadata, answer.dynamic_metadata, pods)
    return ""


def _value_problem(match: rec.HeaderValue, value: str, pods: Mapping[str, set[str]] | None) -> str:
    which = match.WhichOneof("match")
    if which == "equals" and value != match.equals:
        return f"expected {match.equals!r}, got {value!r}"
    if which == "any_pod_of_model":
        model = match.any_pod_of_model
        if pods is None:
            host, _, port = value.rpartition(":")
            if not host or not port.isdigit():
                return f"expected a pod address of {model}, got {value!r}"
        elif value not in pods.get(model, set()):
            return f"{value!r} is not a pod of {model}"
    return ""


def _metadata_problem(
    expected: struct_pb2.Struct, got: struct_pb2.Struct, pods: Mapping[str, set[str]] | None
) -> str:
    want = json_format.MessageToDict(expected)
    have = json_format.MessageToDict(got)
    return _dict_problem(want, have, pods, "metadata")


def _dict_problem(want: object, have: object, pods: Mapping[str, set[str]] | None, at: str) -> str:
    if isinstance(want, dict) and set(want) == {"anyPodOfModel"}:
        match = rec.HeaderValue(any_pod_of_model=want["anyPodOfModel"])
        problem = _value_problem(match, str(have), pods)
        return f"{at}: {problem}" if problem else ""
    if isinstance(want, dict) and set(want) == {"present"}:
        return "" if have not in (None, "") else f"{at} is missing"
    if isinstance(want, dict):
        if not isinstance(have, dict):
            return f"{at}: expected an object, got {orjson.dumps(have).decode()}"
        for key, value in want.items():
            problem = _dict_problem(value, have.get(key), pods, f"{at}.{key}")
            if problem:
                return problem
        return ""
    return "" if want == have else f"{at}: expected {want!r}, got {have!r}"


async def replay_paths(
    paths: Iterable[str | Path],
    target: str,
    models_file: str | None = None,
    answer_timeout: float = ANSWER_TIMEOUT,
) -> list[ReplayResult]:
    """Replay every recording under `paths` against the ext_proc server at `target`."""
    pods = pods_by_model(models_file)
    results = []
    async with grpc.aio.insecure_channel(target) as channel:
        for path in recording_files(paths):
            try:
                recording = recordings.load(path)
            except (OSError, ValueError, json_format.ParseError) as exc:
                results.append(ReplayResult(path.stem, False, f"cannot read {path}: {exc}"))
                continue
            results.append(await replay_one(channel, recording, pods, answer_timeout))
    return results
