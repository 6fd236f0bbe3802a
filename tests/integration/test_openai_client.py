"""The official `openai` Python client, pointed at Envoy, works as it does against
OpenAI: completions, streams, embeddings, the models list, and typed errors."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.integration.stack import (
    CHAT_MODEL,
    LIFECYCLE_MODEL,
    SOLO_MODEL,
    UNREADY_MODEL,
    Gateway,
    Pod,
    model_addresses,
)

MAX_TOKENS = 8
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello."}]


def client_for(gateway: Gateway) -> openai.OpenAI:
    # No retries: a test must see the first answer, not a retried one.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="dummy", max_retries=0, timeout=30.0)


@pytest.fixture(scope="module")
def client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    with client_for(gateway) as client:
        yield client


@pytest.fixture(scope="module")
def any_client(any_gateway: Gateway) -> Iterator[openai.OpenAI]:
    with client_for(any_gateway) as client:
        yield client


def pod_tags(pods: dict[str, Pod], model: str) -> set[str]:
    """How replies from the model's pods start (`sim-<port>:`)."""
    return {f"sim-{address.rpartition(':')[2]}:" for address in model_addresses(pods, model)}


def test_chat_completion(any_client: openai.OpenAI, pods: dict[str, Pod]) -> None:
    completion = any_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
    )

    assert completion.model == CHAT_MODEL
    content = completion.choices[0].message.content or ""
    assert content.split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == MAX_TOKENS


def test_streamed_chat_completion(any_client: openai.OpenAI, pods: dict[str, Pod]) -> None:
    stream = any_client.chat.completions.create(
        model=CHAT_MODEL,
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        stream=True,
    )
    chunks = [c for c in stream if isinstance(c, ChatCompletionChunk) and c.choices]

    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) == MAX_TOKENS
    assert "".join(pieces).split(" ", 1)[0] in pod_tags(pods, CHAT_MODEL)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_unknown_model_raises_not_found(any_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        any_client.chat.completions.create(model="no-such-model", messages=MESSAGES)

    assert raised.value.status_code == 404
    assert raised.value.code == "model_not_found"
    assert "no-such-model" in raised.value.message


def test_model_without_ready_pods_raises_a_503(client: openai.OpenAI) -> None:
    with pytest.raises(openai.InternalServerError) as raised:
        client.chat.completions.create(model=UNREADY_MODEL, messages=MESSAGES)

    assert raised.value.status_code == 503
    assert raised.value.code == "no_ready_pods"
    assert int(raised.value.response.headers["retry-after"]) > 0


def test_text_completion(client: openai.OpenAI, pods: dict[str, Pod]) -> None:
    completion = client.completions.create(model=SOLO_MODEL, prompt="Once upon", max_tokens=4)

    assert completion.choices[0].text.split(" ", 1)[0] in pod_tags(pods, SOLO_MODEL)


def test_embeddings(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model=SOLO_MODEL, input=["one", "two"])

    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) > 0 for item in result.data)


def test_models_list(client: openai.OpenAI) -> None:
    assert {model.id for model in client.models.list()} == {
        CHAT_MODEL,
        SOLO_MODEL,
        LIFECYCLE_MODEL,
    }


def test_models_retrieve(client: openai.OpenAI) -> None:
    model = client.models.retrieve(CHAT_MODEL)

    assert (model.id, model.object) == (CHAT_MODEL, "model")
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("no-such-model")
    assert raised.value.code == "model_not_found"
