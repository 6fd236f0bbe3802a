"""Flow control over real gRPC: a held request's stream stays unanswered (but for the
notice that extends Envoy's message timeout) until a pod has room, and then gets its
routing answer; or its 429 after the queue timeout; or is dropped when the client
leaves. One pod, at most one request in flight on it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import orjson
import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as ext
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ext_grpc

from gateway_extproc.config import Settings
from gateway_extproc.server import Gateway, start_gateway, stop_gateway
from tests import frames
from tests.waiting import eventually

MODELS = """
models:
  - name: llama
    pods:
      - {name: llama-0, address: 127.0.0.1:18001}
  - name: cold
    pods:
      - {name: cold-0, address: 127.0.0.1:18002, state: not-ready}
"""

MakeGateway = Callable[..., Any]


@pytest.fixture
async def make_gateway(tmp_path) -> AsyncIterator[MakeGateway]:
    started: list[Gateway] = []
    path = tmp_path / "models.yaml"
    path.write_text(MODELS)

    async def make(**settings: Any) -> Gateway:
        values: dict[str, Any] = {
            "listen_host": "127.0.0.1",
            "grpc_port": 0,
            "admin_port": 0,
            "models_file": str(path),
            "models_reload_interval": 0.05,
            "grace_period": 0.5,
            "max_inflight_per_pod": 1,
            "queue_timeout": 30.0,
            "wait_for_pods": 0.0,
            **settings,
        }
        gateway = await start_gateway(Settings(**values))
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await stop_gateway(gateway)


class Stream:
    """One ext_proc stream, driven frame by frame as Envoy would."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.call = ext_grpc.ExternalProcessorStub(channel).Process()

    async def send_request(self, doc: dict[str, Any], headers: dict[str, str] | None = None):
        await self.call.write(frames.request_headers(headers=headers))
        answer = await self.call.read()
        assert answer.WhichOneof("response") == "request_headers"
        await self.call.write(frames.request_body(orjson.dumps(doc)))

    async def answer(self, timeout: float = 5.0) -> ext.ProcessingResponse:
        return await asyncio.wait_for(self.call.read(), timeout)

    async def finish_response(self) -> None:
        await self.call.write(frames.response_headers(200))
        await self.answer()
        await self.call.write(frames.response_body(b"{}", end_of_stream=True))
        await self.answer()


async def routed(channel, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Stream:
    stream = Stream(channel)
    await stream.send_request(doc, headers)
    answer = await stream.answer()
    assert answer.WhichOneof("response") == "request_body", answer
    return stream


async def held(channel, doc: dict[str, Any], headers: dict[str, str] | None = None) -> Stream:
    """A stream whose request the processor holds: only the timeout notice came."""
    stream = Stream(channel)
    await stream.send_request(doc, headers)
    notice = await stream.answer()
    assert notice.WhichOneof("response") is None, notice
    assert notice.override_message_timeout.ToTimedelta().total_seconds() > 0
    return stream


LLAMA = {"model": "llama", "prompt": "hi"}


async def test_a_held_request_is_routed_when_the_busy_pod_frees(make_gateway):
    gateway = await make_gateway()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        second = await held(channel, LLAMA)
        assert gateway.flow.held == 1
        assert gateway.inflight.total() == 1  # the engine sees one request, not two
        await first.finish_response()
        answer = await second.answer()
        assert answer.WhichOneof("response") == "request_body"
        assert frames.set_headers(answer)["target-pod"] == "127.0.0.1:18001"
        assert gateway.flow.held == 0
        await second.finish_response()
    assert gateway.inflight.total() == 0


async def test_a_request_held_past_the_queue_timeout_gets_429(make_gateway):
    gateway = await make_gateway(queue_timeout=0.2, retry_after_seconds=7)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        second = await held(channel, LLAMA)
        answer = await second.answer()
        assert answer.immediate_response.status.code == 429
        body = orjson.loads(answer.immediate_response.body)
        assert body["error"]["code"] == "queue_timeout"
        assert frames.set_headers(answer)["retry-after"] == "7"
        assert gateway.flow.held == 0
        await first.finish_response()


async def test_a_client_that_leaves_while_held_is_dropped_at_once(make_gateway):
    gateway = await make_gateway()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        second = await held(channel, LLAMA)
        third = await held(channel, LLAMA)
        second.call.cancel()  # Envoy resets the stream when the client goes away
        await eventually(lambda: gateway.flow.held == 1, what="the queue lost the client that left")
        await first.finish_response()
        # The slot goes to the client still waiting, not to the one that left.
        answer = await third.answer()
        assert answer.WhichOneof("response") == "request_body"
        await third.finish_response()
    assert gateway.inflight.total() == 0


async def test_higher_priority_leaves_the_queue_first(make_gateway):
    gateway = await make_gateway()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        low = await held(channel, LLAMA)
        high = await held(channel, LLAMA, {"x-gateway-priority": "10"})
        await first.finish_response()
        answer = await high.answer()
        assert answer.WhichOneof("response") == "request_body"
        assert gateway.flow.held == 1  # the low one still waits for the slot
        await high.finish_response()
        assert (await low.answer()).WhichOneof("response") == "request_body"
        await low.finish_response()


async def test_a_sheddable_request_is_refused_at_once_when_saturated(make_gateway):
    gateway = await make_gateway()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        shed = Stream(channel)
        await shed.send_request(LLAMA, {"x-gateway-priority": "-1"})
        answer = await shed.answer()  # no notice: it is not held at all
        assert answer.immediate_response.status.code == 429
        assert orjson.loads(answer.immediate_response.body)["error"]["code"] == "request_shed"
        assert gateway.flow.held == 0
        await first.finish_response()
        # With room, a sheddable request is routed like any other.
        later = await routed(channel, LLAMA, {"x-gateway-priority": "-1"})
        await later.finish_response()


async def test_a_model_without_a_ready_pod_waits_for_one(make_gateway, tmp_path):
    gateway = await make_gateway(wait_for_pods=10.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        waiting = await held(channel, {"model": "cold"})
        path = tmp_path / "models.yaml"
        path.write_text(MODELS.replace(", state: not-ready", ""))
        answer = await waiting.answer()
        assert answer.WhichOneof("response") == "request_body"
        assert frames.set_headers(answer)["target-pod"] == "127.0.0.1:18002"
        await waiting.finish_response()


async def test_without_wait_for_pods_a_model_without_a_ready_pod_is_503_at_once(make_gateway):
    gateway = await make_gateway(wait_for_pods=0.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stream = Stream(channel)
        await stream.send_request({"model": "cold"})
        answer = await stream.answer()
        assert answer.immediate_response.status.code == 503
        assert orjson.loads(answer.immediate_response.body)["error"]["code"] == "no_ready_pods"


async def test_a_wait_for_pods_that_runs_out_answers_503(make_gateway):
    gateway = await make_gateway(wait_for_pods=0.2)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        waiting = await held(channel, {"model": "cold"})
        answer = await waiting.answer()
        assert answer.immediate_response.status.code == 503
        assert orjson.loads(answer.immediate_response.body)["error"]["code"] == "no_ready_pods"
        assert frames.set_headers(answer)["retry-after"]


async def test_a_model_turning_terminating_releases_its_waiters_at_once(make_gateway, tmp_path):
    gateway = await make_gateway(wait_for_pods=30.0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        waiting = await held(channel, {"model": "cold"})
        path = tmp_path / "models.yaml"
        path.write_text(MODELS.replace("state: not-ready", "state: terminating"))
        answer = await waiting.answer()
        assert answer.immediate_response.status.code == 503
        code = orjson.loads(answer.immediate_response.body)["error"]["code"]
        assert code == "model_terminating"
        # ...and a new request for it never waits.
        stream = Stream(channel)
        await stream.send_request({"model": "cold"})
        answer = await stream.answer()
        assert answer.immediate_response.status.code == 503
    assert gateway.flow.held == 0


async def test_with_the_priority_header_ignored_a_high_priority_waits_its_turn(make_gateway):
    gateway = await make_gateway(header_policy=(("x-gateway-priority", "ignored"),))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        earlier = await held(channel, LLAMA)
        pushy = await held(channel, LLAMA, {"x-gateway-priority": "100"})
        await first.finish_response()
        assert (await earlier.answer()).WhichOneof("response") == "request_body"
        assert gateway.flow.held == 1  # the "priority 100" request is still waiting
        await earlier.finish_response()
        assert (await pushy.answer()).WhichOneof("response") == "request_body"
        await pushy.finish_response()


async def test_a_rejected_header_is_400_before_anything_else(make_gateway):
    gateway = await make_gateway(header_policy=(("routing-strategy", "rejected"),))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stream = Stream(channel)
        await stream.call.write(frames.request_headers(headers={"routing-strategy": "random"}))
        answer = await stream.answer()
        assert answer.immediate_response.status.code == 400
        error = orjson.loads(answer.immediate_response.body)["error"]
        assert (error["code"], error["param"]) == ("header_not_allowed", "routing-strategy")


async def test_a_tenant_over_its_limit_gets_openais_429(make_gateway, tmp_path):
    config = tmp_path / "flow.yaml"
    config.write_text("limits: {default: {requests: 1}}")
    gateway = await make_gateway(flow_config=str(config), max_inflight_per_pod=0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        tenant = {"x-gateway-inference-fairness-id": "team-a"}
        first = await routed(channel, LLAMA, tenant)
        await first.finish_response()
        other = await routed(channel, {**LLAMA, "user": "someone-else"})
        await other.finish_response()
        stream = Stream(channel)
        await stream.send_request(LLAMA, tenant)
        answer = await stream.answer()
        assert answer.immediate_response.status.code == 429
        assert orjson.loads(answer.immediate_response.body)["error"]["code"] == (
            "rate_limit_exceeded"
        )
        headers = frames.set_headers(answer)
        assert headers["x-ratelimit-limit-requests"] == "1"
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert headers["retry-after"]


async def test_flow_metadata_carries_the_tenant_and_the_token_counts(make_gateway):
    gateway = await make_gateway(flow_metadata=True)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        stream = Stream(channel)
        await stream.send_request({**LLAMA, "user": "team-b"}, {"x-gateway-priority": "4"})
        answer = await stream.answer()
        fields = answer.dynamic_metadata.fields["gateway_extproc"].struct_value.fields
        assert fields["fairness_id"].string_value == "team-b"
        assert fields["priority"].number_value == 4
        await stream.call.write(frames.response_headers(200))
        await stream.answer()
        usage = {"usage": {"prompt_tokens": 5, "completion_tokens": 7}}
        await stream.call.write(frames.response_body(orjson.dumps(usage), end_of_stream=True))
        last = await stream.answer()
        tokens = last.dynamic_metadata.fields["gateway_extproc"].struct_value.fields
        assert tokens["total_tokens"].number_value == 12
        assert tokens["prompt_tokens"].number_value == 5
        assert tokens["completion_tokens"].number_value == 7


async def test_in_full_duplex_a_held_request_gets_its_answers_and_no_notice(make_gateway):
    gateway = await make_gateway()
    duplex = frames.protocol(frames.Mode.FULL_DUPLEX_STREAMED, frames.Mode.FULL_DUPLEX_STREAMED)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.grpc_port}") as channel:
        first = await routed(channel, LLAMA)
        stream = Stream(channel)
        await stream.call.write(frames.request_headers(config=duplex))
        await stream.call.write(frames.request_body(orjson.dumps(LLAMA)))
        await eventually(lambda: gateway.flow.held == 1, what="the request is held")
        await first.finish_response()
        answers = [await stream.answer(), await stream.answer()]
        assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
        assert frames.set_headers(answers[0])["target-pod"] == "127.0.0.1:18001"
