"""Model aliases through Envoy: a split declared in the models file holds to its weights,
the engine receives the target's name in the body, the split shows in the metrics, and an
alias whose targets are all gone is a 404."""

from __future__ import annotations

from collections import Counter

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.stack import (
    CHAT_MODEL,
    SOLO_MODEL,
    Gateway,
    ModelsFile,
    Pod,
    Processor,
    chat,
    http_request,
    model_addresses,
    poll,
    post_json,
)

REQUESTS = 40  # a multiple of the weights' sum, 4


def alias_requests(processor: Processor) -> Counter[tuple[str, str]]:
    counted: Counter[tuple[str, str]] = Counter()
    for family in text_string_to_metric_families(processor.metrics()):
        for sample in family.samples:
            if sample.name == "gateway_alias_requests_total":
                counted[sample.labels["alias"], sample.labels["target"]] = int(sample.value)
    return counted


def declare(models_file: ModelsFile, gateway: Gateway, aliases: dict[str, dict[str, int]]) -> None:
    doc = models_file.load()
    doc["aliases"] = aliases
    models_file.write(doc)
    listed = {name for name, targets in aliases.items() if CHAT_MODEL in targets}
    poll(
        "the processor has the aliases",
        lambda: {m["id"] for m in http_request(gateway.port, "GET", "/v1/models").json()["data"]},
        lambda ids: listed <= ids,
    )


def test_a_split_holds_to_its_weights_and_the_engine_gets_the_target(
    gateway: Gateway, processor: Processor, pods: dict[str, Pod], models_file: ModelsFile
) -> None:
    # "retired" is in no pod's list: skipped, whatever its weight.
    declare(models_file, gateway, {"split": {CHAT_MODEL: 3, SOLO_MODEL: 1, "retired": 50}})
    before = alias_requests(processor)
    served: Counter[str] = Counter()
    for _ in range(REQUESTS):
        response = chat(gateway.port, "split", max_tokens=2)
        assert response.status == 200, response.body
        target = response.json()["model"]  # the simulator answers with the body's model
        assert response.headers["x-simulator-pod"] in model_addresses(pods, target)
        served[target] += 1

    assert set(served) == {CHAT_MODEL, SOLO_MODEL}
    # Weighted round robin makes it 30 / 10 here; a band, as weights promise a share.
    assert 24 <= served[CHAT_MODEL] <= 36
    after = alias_requests(processor)
    assert {target: after["split", target] - before["split", target] for target in served} == dict(
        served
    )


def test_an_anthropic_stream_for_an_alias_is_rewritten_too(
    gateway: Gateway, pods: dict[str, Pod], models_file: ModelsFile
) -> None:
    declare(models_file, gateway, {"chatty": {CHAT_MODEL: 1}})
    doc = {
        "model": "chatty",
        "max_tokens": 3,
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    response = post_json(gateway.port, "/v1/messages", doc)

    assert response.status == 200, response.body
    assert response.headers["x-simulator-pod"] in model_addresses(pods, CHAT_MODEL)
    assert b'"model":"chat-model"' in response.body  # message_start names the target


def test_an_alias_whose_targets_are_all_absent_is_a_404(
    gateway: Gateway, models_file: ModelsFile
) -> None:
    declare(models_file, gateway, {"gone": {"retired": 1}, "live": {CHAT_MODEL: 1}})
    response = chat(gateway.port, "gone")

    assert response.status == 404
    assert response.error_code() == "model_not_found"
    assert "`gone`" in response.json()["error"]["message"]


def test_a_listed_alias_is_retrieved_and_a_dead_one_is_not(
    gateway: Gateway, models_file: ModelsFile
) -> None:
    declare(models_file, gateway, {"gone": {"retired": 1}, "live": {CHAT_MODEL: 1}})

    live = http_request(gateway.port, "GET", "/v1/models/live")
    assert live.status == 200, live.body
    assert live.json() == {
        "id": "live",
        "object": "model",
        "created": 0,
        "owned_by": "gateway-extproc",
    }
    gone = http_request(gateway.port, "GET", "/v1/models/gone")
    assert (gone.status, gone.error_code()) == (404, "model_not_found")
