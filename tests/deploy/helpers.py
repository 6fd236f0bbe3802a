"""Shared pieces of the deployment tests: rendering the chart with the real Helm engine
(helm-python-sdk embeds Helm's Go library), reading manifests, and validating objects
against the Kubernetes schemas (kubernetes-validate, offline) or the published CRDs kept
unchanged in tests/deploy/crds (tests/deploy/crd_schema.py says how).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import yaml

from tests.deploy.crd_schema import CustomResourceSchema, schemas_of

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "gateway-extproc"
PLAIN = ROOT / "envoy" / "gateway"
PLAIN_INFERENCEPOOL = ROOT / "envoy" / "inferencepool"
CRDS = Path(__file__).resolve().parent / "crds"
DATA = Path(__file__).resolve().parent / "data"

RELEASE = "gw"
NAMESPACE = "inference"

# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest the
# installed kubernetes-validate knows: an object must be valid on both.
KUBE_VERSIONS = ("1.27.0", kubernetes_validate.latest_version())

# Every optional part of the chart switched on, the Gateway in another namespace (so
# the cross-namespace pieces render too) and cluster-wide RBAC.
# The labels the example model servers (envoy/gateway/examples) carry for the Service the
# endpoint override routes through.
MODEL_PODS = {"app.kubernetes.io/component": "model-server"}

ALL_ON: dict[str, Any] = {
    "replicaCount": 3,
    "autoscaling": {"enabled": True, "targetMemoryUtilizationPercentage": 80},
    "serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}},
    "grafanaDashboard": {"enabled": True, "namespace": "monitoring"},
    "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
    "rbac": {"scope": "cluster"},
    "kubernetes": {"watchNamespaces": ["models-a", "models-b"]},
    "config": {
        "recordDir": "/var/lib/gateway-extproc/recordings",
        "allowedPaths": ["/v1/chat/completions", "/v1/audio/*"],
        "injectIncludeUsage": True,
        "defaultStrategy": "least-request",
        "extraEnv": {"GATEWAY_LOG_FORMAT": "console"},
    },
    "extraArgs": ["--log-level", "debug"],
    "extraEnv": [{"name": "PYTHONFAULTHANDLER", "value": "1"}],
    "podAnnotations": {"example.com/team": "inference"},
    "podLabels": {"example.com/tier": "routing"},
    "priorityClassName": "system-cluster-critical",
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
        }
    ],
    "serviceAccount": {"annotations": {"example.com/owner": "platform"}},
    "envoyGateway": {
        "enabled": True,
        "gateway": {"name": "eg", "namespace": "envoy-gateway-system", "listenerName": "http"},
        "attachTo": "Gateway",
        "httpRoute": {
            "hostnames": ["llm.example.com"],
            "backendRef": {"selector": MODEL_PODS},
        },
        "extProc": {"statusOnErrorField": True},
    },
}

STATIC: dict[str, Any] = {
    "config": {"discovery": "static"},
    "staticModels": {
        "models": [
            {
                "name": "llama-3-8b",
                # Loopback: test_processor_start runs the processor on this file, and
                # it scrapes ready pods; nothing it sends may leave this machine.
                "pods": [
                    {"name": "llama-0", "address": "127.0.0.1:18990"},
                    {"name": "llama-1", "address": "127.0.0.1:18991", "state": "not-ready"},
                ],
            }
        ]
    },
}

ENVOY_GATEWAY: dict[str, Any] = {
    "envoyGateway": {"enabled": True, "httpRoute": {"backendRef": {"selector": MODEL_PODS}}}
}

# Envoy Gateway v1.4: the ORIGINAL_DST cluster by patch instead of the endpoint override.
ORIGINAL_DST: dict[str, Any] = {"envoyGateway": {"enabled": True, "routing": "originalDst"}}

FULL_DUPLEX: dict[str, Any] = {
    "envoyGateway": {
        "enabled": True,
        "extProc": {"fullDuplexStreamed": True},
        "httpRoute": {"backendRef": {"selector": MODEL_PODS}},
    }
}

# The endpoint picker of an InferencePool, with both kinds of route to it.
INFERENCEPOOL: dict[str, Any] = {
    "config": {"discovery": "inferencepool"},
    "inferencePool": {
        "selector": {"app": "vllm-qwen"},
        "targetPorts": [8000, 8001],
        "httpRoute": {"enabled": True, "gateway": {"listenerName": "http"}},
        "aiGatewayRoute": {"enabled": True, "models": ["qwen2.5-0.5b"]},
    },
}

# An existing pool served with a certificate of its own, routes to a Gateway elsewhere.
INFERENCEPOOL_EXISTING: dict[str, Any] = {
    "config": {"discovery": "inferencepool"},
    "inferencePool": {
        "create": False,
        "name": "shared-pool",
        "certSecretName": "picker-tls",
        "httpRoute": {
            "enabled": True,
            "gateway": {"name": "eg", "namespace": "envoy-gateway-system"},
            "hostnames": ["llm.example.com"],
        },
        "aiGatewayRoute": {"enabled": True, "gateway": {"namespace": "envoy-gateway-system"}},
    },
}

VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "all-on": ALL_ON,
    "static": STATIC,
    "envoy-gateway": ENVOY_GATEWAY,
    "original-dst": ORIGINAL_DST,
    "full-duplex": FULL_DUPLEX,
    "inferencepool": INFERENCEPOOL,
    "inferencepool-existing": INFERENCEPOOL_EXISTING,
}


@cache
def _render(values_json: str, release: str, namespace: str) -> tuple[tuple[str, str], ...]:
    with helm.Chart.load(CHART) as chart:
        rendered = chart.render(
            json.loads(values_json), name=release, namespace=namespace, is_install=True
        )
    return tuple(sorted(rendered.items()))


def render(
    values: dict[str, Any] | None = None, *, release: str = RELEASE, namespace: str = NAMESPACE
) -> list[dict[str, Any]]:
    """The chart's Kubernetes objects for these values, in template order."""
    objects: list[dict[str, Any]] = []
    for template, text in _render(json.dumps(values or {}, sort_keys=True), release, namespace):
        if template.endswith("NOTES.txt"):
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return objects


def rendered_texts(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> the YAML text Helm produced, before any parsing."""
    return dict(_render(json.dumps(values or {}, sort_keys=True), RELEASE, NAMESPACE))


def render_error(values: dict[str, Any]) -> str:
    """The message of the Helm error these values cause; fails if they render."""
    try:
        render(values)
    except helm.HelmError as exc:
        return str(exc)
    raise AssertionError(f"the chart rendered with {values!r}, expected it to refuse")


def one(objects: Iterable[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def all_of(objects: Iterable[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def container(objects: Iterable[dict[str, Any]]) -> dict[str, Any]:
    containers = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def settings(objects: Iterable[dict[str, Any]]) -> dict[str, str]:
    """The GATEWAY_* variables the container gets from its settings ConfigMap."""
    objects = list(objects)
    env: dict[str, str] = {}
    for source in container(objects).get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    return env


def plain_manifests(folder: Path = PLAIN) -> list[dict[str, Any]]:
    """The objects of the plain manifests in `folder` (envoy/gateway by default)."""
    objects: list[dict[str, Any]] = []
    for path in sorted(folder.glob("*.yaml")):
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


def every_plain_manifest() -> list[dict[str, Any]]:
    """envoy/gateway/ and envoy/inferencepool/ together."""
    return plain_manifests(PLAIN) + plain_manifests(PLAIN_INFERENCEPOOL)


# -- schema validation ---------------------------------------------------------------------


@cache
def _crds() -> dict[tuple[str, str], CustomResourceSchema]:
    """(apiVersion, kind) -> its schema, for every served version of the CRDs kept."""
    return {
        (schema.api_version, schema.kind): schema
        for crd in crd_documents()
        for schema in schemas_of(crd)
    }


@cache
def _crd_documents() -> tuple[dict[str, Any], ...]:
    documents = []
    for path in sorted(CRDS.glob("*.yaml")):
        documents += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return tuple(documents)


def crd_documents() -> list[dict[str, Any]]:
    """Every CustomResourceDefinition in tests/deploy/crds (some files hold several)."""
    return list(_crd_documents())


def is_custom(obj: dict[str, Any]) -> bool:
    return (obj["apiVersion"], obj["kind"]) in _crds()


def validate(obj: dict[str, Any]) -> None:
    """Raise if `obj` is not a valid object of its kind.

    Built-in kinds are checked with kubernetes-validate's strict schemas (unknown fields
    are errors) for every version in KUBE_VERSIONS; custom resources against their CRD in
    tests/deploy/crds as the API server would check them (defaults, pruning as an error,
    schema, CEL rules), plus their metadata as Kubernetes ObjectMeta. A kind with neither
    is an error, so nothing the chart creates goes unchecked.
    """
    where = f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"
    key = (obj["apiVersion"], obj["kind"])
    if key in _crds():
        problems = _crds()[key].problems(obj)
        if problems:
            raise AssertionError(f"{where}: " + "; ".join(problems))
        # Any built-in kind checks ObjectMeta the same way; a ConfigMap carries nothing else.
        validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": obj["metadata"]})
        return
    for version in KUBE_VERSIONS:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            raise AssertionError(f"{where}: no schema: {exc.message}") from None
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            raise AssertionError(f"{where} (Kubernetes {version}): {path}: {exc.message}") from None


def walk(value: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every (key path, value) of nested mappings, parents before children."""
    if isinstance(value, dict):
        for key, child in value.items():
            yield (*path, str(key)), child
            yield from walk(child, (*path, str(key)))
