"""The Grafana dashboard shipped in the chart queries metrics the processor really
exports, with their real labels, and covers every metric operators need."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client import REGISTRY

from gateway_extproc import telemetry  # noqa: F401  (registers the metrics)
from tests.deploy import helpers

DASHBOARD = helpers.CHART / "dashboards" / "gateway-extproc.json"
REQUIRED = {
    "gateway_requests_total",
    "gateway_in_flight_requests",
    "gateway_routing_decision_seconds",
    "gateway_tokens_total",
    "gateway_time_to_first_token_seconds",
    "gateway_inter_token_latency_seconds",
    "gateway_request_duration_seconds",
    "gateway_models",
    "gateway_routing_fallback_total",
    "gateway_metrics_scrape_failures_total",
    "pod_coldstart_duration_seconds",
}
SERIES = re.compile(r"\b((?:gateway|pod)_[a-z_]+?)(_bucket|_count|_sum)?\b(?=\s*[{\[)])")
# PromQL words that look like series names to the pattern above but are not.
PROMQL = {"histogram_quantile"}


def exported() -> dict[str, tuple[str, set[str]]]:
    """Metric name as written in PromQL -> (type, label names), from the live registry."""
    metrics: dict[str, tuple[str, set[str]]] = {}
    for collector in list(REGISTRY._collector_to_names):  # type: ignore[attr-defined]
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe() if hasattr(collector, "describe") else ():
            name = family.name + ("_total" if family.type == "counter" else "")
            metrics[name] = (family.type, labels)
    return metrics


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def expressions() -> list[str]:
    return [t["expr"] for p in panels() for t in p["targets"]]


def test_dashboard_is_grafana_json_with_unique_panels() -> None:
    board = dashboard()
    ids = [p["id"] for p in board["panels"]]

    assert board["uid"] and board["title"]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "model"}
    for p in panels():
        assert p["datasource"]["uid"] == "${datasource}"
        assert p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["targets"], p["title"]


def test_every_queried_metric_is_exported_with_the_labels_used() -> None:
    metrics = exported()
    for expr in expressions():
        used = [(m, suffix) for m, suffix in SERIES.findall(expr) if m not in PROMQL]
        assert used, expr
        allowed = {"le"}
        for name, suffix in used:
            assert name in metrics, f"{name} is not exported ({expr})"
            kind, labels = metrics[name]
            if suffix:
                assert kind == "histogram", f"{name}{suffix} on a {kind}"
            allowed |= labels
        grouped = {
            label.strip()
            for group in re.findall(r"by \(([^)]*)\)", expr)
            for label in group.split(",")
        }
        selected = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
        assert grouped | selected <= allowed, (
            f"unknown labels {sorted((grouped | selected) - allowed)} in {expr}"
        )


def test_every_processor_metric_an_operator_needs_is_on_the_dashboard() -> None:
    queried = {m for expr in expressions() for m, _ in SERIES.findall(expr)}
    assert queried >= REQUIRED, sorted(REQUIRED - queried)


def test_histograms_are_read_as_quantiles_of_their_buckets() -> None:
    metrics = exported()
    for expr in expressions():
        for name, suffix in SERIES.findall(expr):
            if metrics.get(name, ("",))[0] == "histogram":
                assert suffix in ("_bucket", "_count", "_sum"), expr
        if "histogram_quantile" in expr:
            assert "_bucket" in expr and re.search(r"by \([^)]*\ble\b", expr), expr
