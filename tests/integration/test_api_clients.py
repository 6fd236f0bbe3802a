"""The official `openai` client's Responses API and the official `anthropic` client's
Messages API, pointed at Envoy, work as they do against the real services: whole and
streamed responses, typed errors in each API's own shape, and the processor counts the
tokens the engine reported."""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import openai
import pytest
from anthropic.types import RawContentBlockDeltaEvent
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import (
    CHAT_MODEL,
    SOLO_MODEL,
    UNREADY_MODEL,
    Gateway,
    Pod,
    Processor,
    model_addresses,
    poll,
)
from tests.integration.test_openai_client import client_for, pod_tags

MAX_TOKENS = 6


@pytest.fixture(scope="module")
def openai_client(any_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with client_for(any_gateway) as client:
        yield client


@pytest.fixture(scope="module")
def anthropic_client(any_gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    # The client adds /v1/messages to the base URL; no retries, as for openai.
    with anthropic.Anthropic(
        base_url=any_gateway.url, api_key="dummy", max_retries=0, timeout=30.0
    ) as client:
        yield client


def tokens_of(processor: Processor, model: str) -> tuple[float, float]:
    """(prompt, completion) tokens the processor counted for `model`, over its pods."""
    counted = {"prompt": 0.0, "completion": 0.0}
    for family in text_string_to_metric_families(processor.metrics()):
        for sample in family.samples:
            if sample.name == "gateway_tokens_total" and sample.labels["model"] == model:
                counted[sample.labels["kind"]] += sample.value
    return counted["prompt"], counted["completion"]


def counted_after(
    processor: Processor, model: str, before: tuple[float, float], usage: tuple[int, int]
) -> None:
    """Wait until the processor has counted `usage` more tokens than `before` (it counts
    once the response has passed), and not more."""
    expected = (before[0] + usage[0], before[1] + usage[1])
    seen = poll(
        f"{usage} tokens counted for {model}",
        lambda: tokens_of(processor, model),
        lambda now: now[0] >= expected[0] and now[1] >= expected[1],
    )
    assert seen == expected


# -- OpenAI Responses ---------------------------------------------------------------------


def test_response(openai_client: openai.OpenAI, pods: dict[str, Pod], processor: Processor):
    before = tokens_of(processor, CHAT_MODEL)
    response = openai_client.responses.create(
        model=CHAT_MODEL,
        instructions="Answer in one line.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}],
        max_output_tokens=MAX_TOKENS,
    )

    assert response.model == CHAT_MODEL
    assert response.output_text.split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    assert response.usage is not None and response.usage.output_tokens == MAX_TOKENS
    counted_after(
        processor, CHAT_MODEL, before, (response.usage.input_tokens, response.usage.output_tokens)
    )


def test_streamed_response(
    openai_client: openai.OpenAI, pods: dict[str, Pod], processor: Processor
):
    before = tokens_of(processor, CHAT_MODEL)
    events = list(openai_client.responses.create(model=CHAT_MODEL, input="Say hello.", stream=True))

    assert events[0].type == "response.created"
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas).split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    final = events[-1]
    assert final.type == "response.completed"
    usage = final.response.usage
    assert usage is not None and usage.output_tokens == len(deltas)
    counted_after(processor, CHAT_MODEL, before, (usage.input_tokens, usage.output_tokens))


def test_response_stream_helper(openai_client: openai.OpenAI, processor: Processor):
    before = tokens_of(processor, SOLO_MODEL)
    with openai_client.responses.stream(model=SOLO_MODEL, input="Once upon a time") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()

    assert final.output_text == text
    assert final.usage is not None
    counted_after(
        processor, SOLO_MODEL, before, (final.usage.input_tokens, final.usage.output_tokens)
    )


def test_responses_unknown_model_is_an_openai_not_found_error(openai_client: openai.OpenAI):
    with pytest.raises(openai.NotFoundError) as raised:
        openai_client.responses.create(model="no-such-model", input="hi")

    assert raised.value.code == "model_not_found"
    assert "no-such-model" in raised.value.message


# -- Anthropic Messages -------------------------------------------------------------------


def test_message(anthropic_client: anthropic.Anthropic, pods: dict[str, Pod], processor: Processor):
    before = tokens_of(processor, CHAT_MODEL)
    message = anthropic_client.messages.create(
        model=CHAT_MODEL,
        max_tokens=MAX_TOKENS,
        system="Answer in one line.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
    )

    assert message.model == CHAT_MODEL
    assert message.content[0].type == "text"
    assert message.content[0].text.split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == MAX_TOKENS
    counted_after(
        processor, CHAT_MODEL, before, (message.usage.input_tokens, message.usage.output_tokens)
    )


def test_streamed_message(
    anthropic_client: anthropic.Anthropic, pods: dict[str, Pod], processor: Processor
):
    before = tokens_of(processor, CHAT_MODEL)
    with anthropic_client.messages.stream(
        model=CHAT_MODEL,
        max_tokens=MAX_TOKENS,
        messages=[{"role": "user", "content": "Say hello."}],
    ) as stream:
        deltas = [e for e in stream if isinstance(e, RawContentBlockDeltaEvent)]
        final = stream.get_final_message()

    assert len(deltas) == MAX_TOKENS
    assert final.content[0].type == "text"
    assert final.content[0].text.split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    assert final.usage.output_tokens == MAX_TOKENS
    counted_after(
        processor, CHAT_MODEL, before, (final.usage.input_tokens, final.usage.output_tokens)
    )


def test_messages_unknown_model_is_an_anthropic_not_found_error(
    anthropic_client: anthropic.Anthropic,
):
    with pytest.raises(anthropic.NotFoundError) as raised:
        anthropic_client.messages.create(
            model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )

    assert raised.value.status_code == 404
    assert raised.value.body == {
        "type": "error",
        "error": {
            "type": "not_found_error",
            "message": "The model `no-such-model` does not exist.",
        },
    }


def test_messages_model_without_ready_pods_is_overloaded(anthropic_client: anthropic.Anthropic):
    with pytest.raises(anthropic.InternalServerError) as raised:
        anthropic_client.messages.create(
            model=UNREADY_MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )

    assert raised.value.status_code == 503
    assert isinstance(raised.value.body, dict)
    assert raised.value.body["error"]["type"] == "overloaded_error"
    assert int(raised.value.response.headers["retry-after"]) > 0


def test_messages_reach_only_the_models_pods(
    anthropic_client: anthropic.Anthropic, pods: dict[str, Pod]
):
    response = anthropic_client.messages.with_raw_response.create(
        model=SOLO_MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]
    )
    assert response.headers["x-simulator-pod"] in model_addresses(pods, SOLO_MODEL)


def test_without_tracing_the_clients_traceparent_reaches_the_engine_as_sent(
    openai_client: openai.OpenAI,
):
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    raw = openai_client.responses.with_raw_response.create(
        model=CHAT_MODEL, input="hi", extra_headers={"traceparent": traceparent}
    )
    assert raw.headers["x-simulator-traceparent"] == traceparent
