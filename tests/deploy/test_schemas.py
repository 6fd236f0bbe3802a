"""Every object the chart renders, and every plain manifest, is valid for its kind:
built-in kinds against the Kubernetes OpenAPI schemas (kubernetes-validate, offline,
strict: unknown fields are errors), InferencePool, Envoy Gateway, Envoy AI Gateway,
Gateway API and Prometheus Operator kinds against their published CRDs, kept unchanged
in tests/deploy/crds and applied the way the API server applies them."""

from __future__ import annotations

import copy
import hashlib
import re
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
    for folder in (helpers.PLAIN, helpers.PLAIN_INFERENCEPOOL):
        texts |= {str(p): p.read_text() for p in folder.rglob("*.yaml")}
    for template, text in texts.items():
        if not template.endswith("NOTES.txt"):
            list(yaml.load_all(text, Loader=UniqueKeyLoader))


def test_plain_manifests_are_valid() -> None:
    objects = helpers.every_plain_manifest()
    assert objects
    for obj in objects:
        helpers.validate(obj)


def test_every_kept_crd_file_is_used() -> None:
    # No custom kind goes unchecked (validate() fails on a kind without a CRD), and no
    # CRD file is kept that nothing uses.
    objects = [o for v in helpers.VALUE_SETS.values() for o in helpers.render(v)]
    objects += helpers.every_plain_manifest()
    used = {(o["apiVersion"].partition("/")[0], o["kind"]) for o in objects}
    for path in sorted(helpers.CRDS.glob("*.yaml")):
        kinds = {
            (crd["spec"]["group"], crd["spec"]["names"]["kind"])
            for crd in yaml.safe_load_all(path.read_text())
            if crd
        }
        assert kinds & used, f"{path.name} defines nothing the chart or manifests use"


def test_the_crd_files_are_the_published_ones_unchanged() -> None:
    readme = (helpers.CRDS / "README.md").read_text()
    listed = dict(re.findall(r"^\| (\S+\.yaml) \|.*\| ([0-9a-f]{64}) \|$", readme, re.M))
    kept = {p.name: p for p in helpers.CRDS.glob("*.yaml")}
    assert set(listed) == set(kept)
    for name, path in kept.items():
        assert hashlib.sha256(path.read_bytes()).hexdigest() == listed[name], name


def test_kept_crds_are_valid_crds() -> None:
    for crd in helpers.crd_documents():
        assert crd["kind"] == "CustomResourceDefinition"
        assert crd["metadata"]["name"] == f"{crd['spec']['names']['plural']}.{crd['spec']['group']}"


def mutated(kind: str, change: Any, values: dict[str, Any]) -> dict[str, Any]:
    """The chart's first `kind` object for `values`, changed; valid before the change."""
    obj = copy.deepcopy(helpers.all_of(helpers.render(values), kind)[0])
    helpers.validate(obj)
    change(obj)
    return obj


EG = helpers.ENVOY_GATEWAY
POOL = helpers.INFERENCEPOOL


def pool_ref(o: dict[str, Any]) -> dict[str, Any]:
    return o["spec"]["endpointPickerRef"]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("values", "kind", "change", "problem"),
    [
        # A misspelled field of a built-in kind (the API server would refuse or drop it).
        (
            EG,
            "Deployment",
            lambda o: o["spec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicyy="Always"
            ),
            "imagePullPolicyy",
        ),
        (EG, "Service", lambda o: o["spec"]["ports"][0].update(port="grpc"), "port"),
        # Custom kinds: an unknown field, a value outside the enum, a bad duration...
        (
            EG,
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0].update(failopen=False),
            "'failopen' was unexpected",
        ),
        (
            EG,
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0]["processingMode"]["request"].update(body="Full"),
            "'Full' is not one of",
        ),
        (
            EG,
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0].update(messageTimeout="5 seconds"),
            "does not match",
        ),
        (
            EG,
            "EnvoyPatchPolicy",
            lambda o: o["spec"]["jsonPatches"][0]["operation"].update(op="merge"),
            "'merge' is not one of",
        ),
        (
            EG,
            "HTTPRoute",
            lambda o: o["spec"]["rules"][0]["timeouts"].update(request="forever"),
            "does not match",
        ),
        (
            EG,
            "ClientTrafficPolicy",
            lambda o: o["spec"]["connection"].update(bufferLimit="8 MB"),
            "bufferLimit",
        ),
        (
            EG,
            "BackendTrafficPolicy",
            lambda o: o["spec"]["loadBalancer"]["endpointOverride"].update(extractFrom=[]),
            "should be non-empty",
        ),
        (
            EG,
            "BackendTrafficPolicy",
            lambda o: o["spec"]["loadBalancer"]["endpointOverride"]["extractFrom"][0].update(
                metadata={"key": "x"}
            ),
            "'metadata' was unexpected",
        ),
        (
            POOL,
            "InferencePool",
            lambda o: o["spec"]["targetPorts"].append({"number": "8002"}),
            "is not of type 'integer'",
        ),
        (
            POOL,
            "AIGatewayRoute",
            lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(weight="heavy"),
            "is not of type 'integer'",
        ),
        # ...and the CRDs' CEL rules, with the API server's defaults applied first.
        (
            EG,
            "EnvoyExtensionPolicy",
            lambda o: o["spec"]["extProc"][0].update(
                failOpen=True,
                processingMode={"request": {"body": "FullDuplexStreamed"}},
            ),
            "If FullDuplexStreamed body processing mode is used, FailOpen must be false",
        ),
        (
            EG,
            "BackendTrafficPolicy",
            lambda o: o["spec"]["loadBalancer"].update(type="ConsistentHash"),
            "consistentHash field needs to be set",
        ),
        (
            POOL,
            "InferencePool",
            lambda o: o["spec"]["targetPorts"].append({"number": 8000}),
            "port number must be unique",
        ),
        (
            # kind is absent and defaults to Service, which needs a port.
            POOL,
            "InferencePool",
            lambda o: [pool_ref(o).pop("kind"), pool_ref(o).pop("port")],
            "port is required when kind is 'Service'",
        ),
        (
            POOL,
            "AIGatewayRoute",
            lambda o: o["spec"]["rules"][0]["backendRefs"][0].pop("kind"),
            "group and kind must be specified together",
        ),
        (
            POOL,
            "HTTPRoute",
            # A Service backend needs a port; an InferencePool one does not.
            lambda o: o["spec"]["rules"][0]["backendRefs"][0].update(group="", kind="Service"),
            "Must have port for Service reference",
        ),
    ],
)
def test_validation_rejects_broken_objects(
    values: dict[str, Any], kind: str, change: Any, problem: str
) -> None:
    # The checks above mean something only if a wrong object fails them, for its reason.
    obj = mutated(kind, change, values)
    with pytest.raises(AssertionError, match=re.escape(problem)):
        helpers.validate(obj)


def test_structural_schemas_keep_what_they_preserve_and_default() -> None:
    # Unknown fields are allowed where the CRD preserves them: a patch's value is any
    # JSON (x-kubernetes-preserve-unknown-fields), so a field Envoy knows passes.
    patch = mutated(
        "EnvoyPatchPolicy",
        lambda o: o["spec"]["jsonPatches"][-1]["operation"]["value"].update(anything={"x": 1}),
        EG,
    )
    helpers.validate(patch)
    # A default satisfies a rule: the picker's kind defaults to Service, which has a port.
    pool = mutated("InferencePool", lambda o: pool_ref(o).pop("kind"), POOL)
    helpers.validate(pool)


def test_validation_rejects_an_unknown_kind() -> None:
    with pytest.raises(AssertionError, match="no schema"):
        helpers.validate(
            {"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}
        )
