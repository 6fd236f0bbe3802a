"""docs/deploy.md's circuit-breaker recipe for the InferencePool path: the YAML a user
copies is a BackendTrafficPolicy the real CRD accepts (schema, pruning, CEL rules), it
targets the route the shipped InferencePool manifests create, and it raises the breakers
above Envoy's default of 1,024 that a fleet of long streams runs into."""

from __future__ import annotations

import re
from typing import Any

import yaml

from tests.deploy import helpers

GUIDE = helpers.ROOT / "docs" / "deploy.md"
HEADING = "### Circuit breakers on the InferencePool path"
ENVOY_DEFAULT = 1024


def recipe_objects() -> list[dict[str, Any]]:
    text = GUIDE.read_text(encoding="utf-8")
    start = text.index(f"\n{HEADING}\n")
    # Up to the next heading (a YAML comment is "# ", a heading "## " or "### ").
    following = re.search(r"\n#{2,3} ", text[start + 1 :])
    section = text[start : start + 1 + following.start() if following else len(text)]
    blocks = re.findall(r"```yaml\n(.*?)```", section, flags=re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def shipped_routes() -> set[tuple[str, str]]:
    docs = yaml.safe_load_all((helpers.PLAIN_INFERENCEPOOL / "30-httproute.yaml").read_text())
    return {
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in docs
        if d and d["kind"] == "HTTPRoute"
    }


def test_the_recipe_is_a_valid_backend_traffic_policy_on_the_shipped_route() -> None:
    (policy,) = recipe_objects()
    helpers.validate(policy)  # the Envoy Gateway CRD in tests/deploy/crds

    assert (policy["apiVersion"], policy["kind"]) == (
        "gateway.envoyproxy.io/v1alpha1",
        "BackendTrafficPolicy",
    )
    targets = {
        (policy["metadata"]["namespace"], ref["name"])
        for ref in policy["spec"]["targetRefs"]
        if (ref["group"], ref["kind"]) == ("gateway.networking.k8s.io", "HTTPRoute")
    }
    assert targets and targets <= shipped_routes()
    breaker = policy["spec"]["circuitBreaker"]
    for limit in ("maxConnections", "maxParallelRequests", "maxPendingRequests"):
        assert breaker[limit] > ENVOY_DEFAULT, limit


def test_the_recipe_would_be_refused_with_a_misspelt_field() -> None:
    # The check has teeth: the API server prunes a field its schema does not name.
    (policy,) = recipe_objects()
    policy["spec"]["circuitBreaker"]["maxRequests"] = 100000
    try:
        helpers.validate(policy)
    except AssertionError as refused:
        assert "maxRequests" in str(refused)
    else:
        raise AssertionError("a field the CRD does not name was accepted")
