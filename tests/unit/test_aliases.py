"""Model aliases: the models file's `aliases:`, and how a request's target is chosen."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import orjson
import pytest

from gateway_extproc import errors
from gateway_extproc.models.aliases import Alias
from gateway_extproc.models.registry import ModelRegistry, Pod
from gateway_extproc.models.static import ModelFileError, StaticModelSource, parse_models
from gateway_extproc.openai.models_list import models_list_body

MODELS = """
models:
  - {name: v2, pods: [{name: v2-0, address: 127.0.0.1:8001}]}
  - {name: v3, pods: [{name: v3-0, address: 127.0.0.1:8002}]}
  - {name: cold, pods: [{name: cold-0, address: 127.0.0.1:8003, state: not-ready}]}
"""


def registry_with(*pods: Pod) -> ModelRegistry:
    registry = ModelRegistry()
    registry.replace_all(
        pods
        or (
            Pod("v2-0", "10.0.0.2:8000", ("v2",)),
            Pod("v3-0", "10.0.0.3:8000", ("v3",)),
            Pod("cold-0", "10.0.0.4:8000", ("cold",), ready=False),
        )
    )
    return registry


def picks(alias: Alias, registry: ModelRegistry, count: int) -> Counter[str]:
    return Counter(alias.pick(registry) for _ in range(count))


def test_the_file_declares_aliases_with_weighted_targets():
    parsed = parse_models(MODELS + "aliases:\n  llama-3: {v2: 90, v3: 10, later: 5}\n")
    assert parsed.aliases["llama-3"].targets == (("v2", 90), ("v3", 10), ("later", 5))


@pytest.mark.parametrize(
    ("aliases", "named"),
    [
        ("aliases: [llama]", "must be a mapping"),
        ("aliases:\n  llama: v2", "must map target models to weights"),
        ("aliases:\n  llama: {}", "must map target models to weights"),
        ("aliases:\n  v2: {v3: 1}", "'v2' is also a model"),
        ("aliases:\n  a: {v2: 1}\n  b: {a: 1}", "target 'a' is an alias"),
        ("aliases:\n  llama: {v2: -1}", "integer >= 0"),
        ("aliases:\n  llama: {v2: 0.5}", "integer >= 0"),
        ("aliases:\n  llama: {v2: true}", "integer >= 0"),
        ("aliases:\n  llama: {v2: 0, v3: 0}", "every weight is 0"),
        ("aliases:\n  '': {v2: 1}", "non-empty string"),
        ("aliases:\n  7: {v2: 1}", "non-empty string"),
        ("aliases:\n  llama: {7: 1}", "a target must be a model name"),
    ],
)
def test_bad_aliases_are_rejected_naming_the_problem(aliases, named):
    with pytest.raises(ModelFileError, match=named):
        parse_models(MODELS + aliases + "\n")


def test_targets_are_chosen_by_weight_exactly_over_each_cycle_and_interleaved():
    registry = registry_with()
    alias = Alias("llama", (("v2", 90), ("v3", 10)))
    sequence = [alias.pick(registry) for _ in range(100)]
    assert Counter(sequence) == {"v2": 90, "v3": 10}
    assert Counter(sequence[:10]) == {"v2": 9, "v3": 1}  # not ten v3 in a row


def test_absent_and_zero_weight_targets_are_skipped():
    registry = registry_with()
    alias = Alias("llama", (("gone", 100), ("v2", 0), ("v3", 1)))
    assert picks(alias, registry, 7) == {"v3": 7}


def test_unready_targets_are_passed_over_while_a_ready_one_exists():
    registry = registry_with()
    assert picks(Alias("llama", (("cold", 5), ("v3", 1))), registry, 6) == {"v3": 6}
    assert picks(Alias("llama", (("cold", 5), ("gone", 1))), registry, 3) == {"cold": 3}


def test_an_alias_with_every_target_absent_is_not_found():
    with pytest.raises(errors.GatewayError) as raised:
        Alias("llama", (("gone", 1),)).pick(registry_with())
    assert (raised.value.status, raised.value.message) == (
        404,
        "The model `llama` does not exist.",
    )


def test_a_target_that_comes_back_gets_its_share_again():
    registry = registry_with()
    alias = Alias("llama", (("v2", 1), ("v3", 1)))
    registry.delete_pod("v3-0")
    assert picks(alias, registry, 4) == {"v2": 4}
    registry.upsert_pod(Pod("v3-0", "10.0.0.3:8000", ("v3",)))
    assert picks(alias, registry, 10) == {"v2": 5, "v3": 5}


async def test_reloading_the_file_keeps_an_unchanged_alias_in_its_round(tmp_path: Path):
    path = tmp_path / "models.yaml"
    path.write_text(MODELS + "aliases:\n  llama: {v2: 1, v3: 1}\n  other: {v2: 1}\n")
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path))
    assert await source.load()
    llama = registry.aliases["llama"]
    first = llama.pick(registry)
    # Another alias changes; llama's split goes on where it was.
    path.write_text(MODELS + "aliases:\n  llama: {v2: 1, v3: 1}\n  other: {v3: 1}\n")
    assert await source.load()
    assert registry.aliases["llama"] is llama
    assert llama.pick(registry) != first
    path.write_text(MODELS)
    assert await source.load()
    assert registry.aliases == {}


def test_an_alias_is_listed_with_the_models_while_a_target_is_ready():
    registry = registry_with()
    registry.set_aliases(
        {
            "llama": Alias("llama", (("gone", 1), ("v3", 1))),
            "frozen": Alias("frozen", (("cold", 1),)),
            "drained": Alias("drained", (("v2", 0), ("gone", 1))),
        }
    )
    listed = [model["id"] for model in orjson.loads(models_list_body(registry))["data"]]
    assert listed == ["llama", "v2", "v3"]
