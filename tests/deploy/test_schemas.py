"""Every object the chart renders, and every manifest in envoy/gateway/, is valid for its
kind: built-in kinds against the Kubernetes OpenAPI schemas (kubernetes-validate, offline,
strict: unknown fields are errors), Envoy Gateway, Gateway API and Prometheus Operator
kinds against the CRD schemas in tests/deploy/schemas."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.deploy import helpers


@pytest.mark.parametrize("value_set", sorted(helpers.VALUE_SETS))
def test_rendered_objects_are_valid(value_set: str) -> None:
    objects = helpers.render(helpers.VALUE_SETS[value_set])
    assert objects
    for obj in objects:
        helpers.validate(obj)


class UniqueKeyLoader(yaml.SafeLoader):
    """A loader that refuses duplicate mapping keys, as the API server's strict decoding
    does (PyYAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        duplicates = {k for k in keys if keys.count(k) > 1}
        if duplicates:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate keys {sorted(duplicates)}", node.start_mark
            )
        return super().construct_mapping(node, deep=deep)


@pytest.mark.parametrize("value_set", sorted(helpers.VALUE_SETS))
def test_rendered_yaml_has_no_duplicate_keys(value_set: str) -> None:
    texts = helpers.rendered_texts(helpers.VALUE_SETS[value_set])
    texts |= {str(p): p.read_text() for p in helpers.PLAIN.rglob("*.yaml")}
    for template, text in texts.items():
        if not template.endswith("NOTES.txt"):
            list(yaml.load_all(text, Loader=UniqueKeyLoader))


def test_plain_manifests_are_valid() -> None:
    objects = helpers.plain_manifests()
    assert objects
    for obj in objects:
        helpers.validate(obj)


def test_the_crd_schemas_are_exactly_the_custom_kinds_used() -> None:
    # No custom kind goes unchecked (validate() would fail on it) and no schema is stale.
    objects = [o for v in helpers.VALUE_SETS.values() for o in helpers.render(v)]
    objects += helpers.plain_manifests()
    used = {(o["apiVersion"], o["kind"]) for o in objects if helpers.is_custom(o)}
    shipped = {
        (f"{crd['spec']['group']}/{version['name']}", crd["spec"]["names"]["kind"])
        for crd in helpers.crd_documents()
        for version in crd["spec"]["versions"]
    }
    assert used == shipped


def test_crd_test_data_are_valid_crds() -> None:
    for crd in helpers.crd_documents():
        helpers.validate(crd)
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"


def mutated(kind: str, change: Any) -> dict[str, Any]:
    obj = copy.deepcopy(helpers.one(helpers.render(helpers.ENVOY_GATEWAY), kind))
    change(obj)
    return obj


@pytest.mark.parametrize(
    ("kind", "change"),
    [
        # A misspelled field of a built-in kind (the API server would refuse or drop it).
        (
            "Deployment",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicyy="Always"
            ),
        ),
        ("Service", lambda o: o["spec"]["ports"][0].update(port="grpc")),
        # Custom kinds: an unknown field, a value outside the enum, a bad duration.
        ("EnvoyExtensionPolicy", lambda o: o["spec"]["extProc"][0].update(failopen=False)),
        (
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0]["processingMode"]["request"].update(body="Full"),
        ),
        (
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0].update(messageTimeout="5 seconds"),
        ),
        ("EnvoyPatchPolicy", lambda o: o["spec"]["jsonPatches"][0]["operation"].update(op="merge")),
        ("HTTPRoute", lambda o: o["spec"]["rules"][0]["timeouts"].update(request="forever")),
        ("ClientTrafficPolicy", lambda o: o["spec"]["connection"].update(bufferLimit="8 MB")),
    ],
)
def test_validation_rejects_broken_objects(kind: str, change: Any) -> None:
    # The checks above mean something only if a wrong object fails them.
    with pytest.raises(AssertionError):
        helpers.validate(mutated(kind, change))


def test_validation_rejects_an_unknown_kind() -> None:
    with pytest.raises(AssertionError, match="no schema"):
        helpers.validate(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
        )
