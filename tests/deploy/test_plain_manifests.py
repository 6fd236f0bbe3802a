"""envoy/gateway/ and envoy/inferencepool/ hold the chart's resources as plain manifests
for users without Helm; they must stay the chart rendered with the values in
tests/deploy/data (tests/deploy/render_plain.py writes them), and fit together with the
namespace and Gateway shipped beside them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import helpers, render_plain

PLAIN_RELEASE = "gateway-extproc"
PLAIN_NAMESPACE = "inference"
# Shipped beside the chart's resources, not rendered by it.
NOT_FROM_CHART = {"Namespace", "GatewayClass", "Gateway"}
# What only Helm adds: its bookkeeping labels and the checksum that rolls pods when the
# settings change (plain-manifest users restart the Deployment themselves).
HELM_LABELS = ("helm.sh/chart", "app.kubernetes.io/managed-by")


def without_helm_bookkeeping(obj: dict[str, Any]) -> dict[str, Any]:
    for key in HELM_LABELS:
        obj["metadata"].get("labels", {}).pop(key, None)
    if obj["kind"] == "Deployment":
        template = obj["spec"]["template"]["metadata"]
        template.get("annotations", {}).pop("checksum/settings", None)
        if not template.get("annotations"):
            template.pop("annotations", None)
    return obj


def key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


FOLDERS = {
    helpers.PLAIN: "plain-manifests.values.yaml",
    helpers.PLAIN_INFERENCEPOOL: "plain-inferencepool.values.yaml",
}


def chart_for_plain(values_file: str) -> dict[tuple[str, str, str], dict[str, Any]]:
    values = yaml.safe_load((helpers.DATA / values_file).read_text())
    objects = helpers.render(values, release=PLAIN_RELEASE, namespace=PLAIN_NAMESPACE)
    return {key(o): without_helm_bookkeeping(o) for o in objects}


@pytest.mark.parametrize("folder", sorted(FOLDERS), ids=lambda p: p.name)
def test_plain_manifests_are_the_rendered_chart(folder: Path) -> None:
    plain = {key(o): o for o in helpers.plain_manifests(folder) if o["kind"] not in NOT_FROM_CHART}
    chart = chart_for_plain(FOLDERS[folder])

    assert sorted(plain) == sorted(chart)
    for k in chart:
        assert plain[k] == chart[k], f"{k} differs from the chart's rendering"


@pytest.mark.parametrize("plain", render_plain.FILES, ids=lambda f: str(f.path.name))
def test_plain_files_are_what_the_renderer_writes(plain: render_plain.PlainFile) -> None:
    # Comments included: a regenerated file is a reviewable diff, never a surprise.
    assert plain.path.read_text() == render_plain.text_of(plain), (
        f"{plain.path} is stale: run .venv/bin/python -m tests.deploy.render_plain"
    )


def test_the_pool_manifests_fit_their_namespace_and_gateway() -> None:
    objects = helpers.plain_manifests(helpers.PLAIN_INFERENCEPOOL)
    (namespace,) = helpers.all_of(objects, "Namespace")
    gateway = helpers.one(objects, "Gateway")
    pool = helpers.one(objects, "InferencePool")
    service = helpers.one(objects, "Service")
    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "GatewayClass")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {namespace["metadata"]["name"]}
    assert pool["spec"]["endpointPickerRef"]["name"] == service["metadata"]["name"]
    for kind in ("HTTPRoute", "AIGatewayRoute"):
        route = helpers.one(objects, kind)
        (parent,) = route["spec"]["parentRefs"]
        assert parent["name"] == gateway["metadata"]["name"]
        assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]
    # The example model servers are the pool's pods.
    for path in sorted((helpers.PLAIN / "examples").glob("*.yaml")):
        for deployment in yaml.safe_load_all(path.read_text()):
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            assert pool["spec"]["selector"]["matchLabels"].items() <= labels.items(), path.name


def test_plain_manifests_fit_their_namespace_and_gateway() -> None:
    objects = helpers.plain_manifests()
    (namespace,) = helpers.all_of(objects, "Namespace")
    gateway = helpers.one(objects, "Gateway")
    gateway_class = helpers.one(objects, "GatewayClass")
    route = helpers.one(objects, "HTTPRoute")
    patch = helpers.one(objects, "EnvoyPatchPolicy")

    namespaced = [o for o in objects if o["kind"] not in ("Namespace", "GatewayClass")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {namespace["metadata"]["name"]}
    assert gateway["spec"]["gatewayClassName"] == gateway_class["metadata"]["name"]
    assert (
        gateway_class["spec"]["controllerName"] == "gateway.envoyproxy.io/gatewayclass-controller"
    )
    (parent,) = route["spec"]["parentRefs"]
    assert parent["name"] == gateway["metadata"]["name"]
    assert parent["sectionName"] in {listener["name"] for listener in gateway["spec"]["listeners"]}
    # The patch edits the xDS resources Envoy Gateway generates for that listener.
    xds_name = (
        f"{gateway['metadata']['namespace']}/{gateway['metadata']['name']}/{parent['sectionName']}"
    )
    targets = {p["name"] for p in patch["spec"]["jsonPatches"] if not p["type"].endswith("Cluster")}
    assert targets == {xds_name}
    assert patch["spec"]["targetRef"]["name"] == gateway["metadata"]["name"]
