"""The flow-control file, the header policy flag, and how a request is classified."""

from __future__ import annotations

import argparse

import pytest

from gateway_extproc.config import add_serve_arguments, header_policy, settings_from_args
from gateway_extproc.errors import GatewayError
from gateway_extproc.flowcontrol.classify import FlowKey, flow_key, screen_headers
from gateway_extproc.flowcontrol.config import (
    FlowConfigError,
    HeaderTrust,
    TenantLimits,
    load_flow_config,
    parse_flow_config,
)
from gateway_extproc.models.source import source_names

EXAMPLE = """
objectives: {critical: 100, batch: -1}
limits:
  window_seconds: 10
  default: {requests: 60, tokens: 1000}
  tenants:
    team-a: {requests: 600}
    open: {requests: 0, tokens: 0}
"""


def test_a_full_file_reads_as_written_and_tenants_inherit_what_they_leave_out():
    config = parse_flow_config(EXAMPLE)
    assert config.objectives == {"critical": 100, "batch": -1}
    assert config.window_seconds == 10
    assert config.limits_for("someone") == TenantLimits(60, 1000)
    assert config.limits_for("team-a") == TenantLimits(600, 1000)
    assert config.limits_for("open") == TenantLimits(0, 0)
    assert config.has_limits


def test_no_file_means_no_objectives_and_no_limits():
    config = load_flow_config("")
    assert config.objectives == {}
    assert not config.has_limits


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("objectives: [a, b]", "objectives"),
        ("objectives: {a: high}", "objectives.a"),
        ("limits: {window_seconds: 0}", "window_seconds"),
        ("limits: {default: {requests: -1}}", "limits.default.requests"),
        ("limits: {default: {rpm: 5}}", "rpm"),
        ("limits: {tenants: {a: {tokens: 1.5}}}", "limits.tenants.a.tokens"),
        ("priorities: {}", "priorities"),
        ("objectives: {a: 1", "YAML"),
        ("- 1", "mapping"),
    ],
)
def test_a_bad_file_is_refused_naming_the_problem(text, named):
    with pytest.raises(FlowConfigError) as caught:
        parse_flow_config(text)
    assert named in str(caught.value)


def test_an_unreadable_file_names_itself(tmp_path):
    with pytest.raises(FlowConfigError) as caught:
        load_flow_config(str(tmp_path / "missing.yaml"))
    assert "missing.yaml" in str(caught.value)


def test_header_policy_flag_and_variable(monkeypatch):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, source_names())
    args = parser.parse_args(["--header-policy", "priority=ignored, routing-strategy=rejected"])
    assert settings_from_args(args).header_policy == (
        ("x-gateway-priority", "ignored"),
        ("routing-strategy", "rejected"),
    )
    monkeypatch.setenv("GATEWAY_HEADER_POLICY", "fairness-id=ignored")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, source_names())
    assert settings_from_args(parser.parse_args([])).header_policy == (
        ("x-gateway-inference-fairness-id", "ignored"),
    )


@pytest.mark.parametrize("raw", ["priority", "prio=ignored", "priority=maybe"])
def test_a_bad_header_policy_is_refused(raw):
    with pytest.raises(ValueError):
        header_policy(raw)


def test_ignored_headers_are_dropped_and_rejected_ones_are_400():
    policy = {
        "x-gateway-priority": HeaderTrust.IGNORED,
        "routing-strategy": HeaderTrust.REJECTED,
        "x-gateway-inference-objective": HeaderTrust.TRUSTED,
    }
    headers = {"x-gateway-priority": "100", "x-gateway-inference-objective": "critical"}
    screen_headers(headers, policy)
    assert headers == {"x-gateway-inference-objective": "critical"}
    with pytest.raises(GatewayError) as caught:
        screen_headers({"routing-strategy": "random"}, policy)
    assert caught.value.status == 400
    assert caught.value.code == "header_not_allowed"
    assert caught.value.param == "routing-strategy"


def test_priority_comes_from_the_header_else_the_objective_else_zero():
    objectives = {"critical": 100, "batch": -1}
    assert flow_key({"x-gateway-priority": "7"}, "", objectives).priority == 7
    assert flow_key({"x-gateway-inference-objective": "batch"}, "", objectives).priority == -1
    both = {"x-gateway-priority": "3", "x-gateway-inference-objective": "critical"}
    assert flow_key(both, "", objectives).priority == 3
    assert flow_key({"x-gateway-inference-objective": "unknown"}, "", objectives).priority == 0
    assert flow_key({}, "", objectives) == FlowKey(0, "")


@pytest.mark.parametrize("value", ["high", "1.5", "9" * 40])
def test_a_priority_that_is_no_integer_is_400(value):
    with pytest.raises(GatewayError) as caught:
        flow_key({"x-gateway-priority": value}, "", {})
    assert caught.value.code == "invalid_priority"


def test_fairness_id_comes_from_the_header_else_user_header_else_body_user():
    header = "x-gateway-inference-fairness-id"
    assert flow_key({header: "t1", "user": "u"}, "b", {}).fairness_id == "t1"
    assert flow_key({"user": "u"}, "b", {}).fairness_id == "u"
    assert flow_key({}, "b", {}).fairness_id == "b"
    assert flow_key({}, "", {}).fairness_id == ""
    assert len(flow_key({header: "x" * 1000}, "", {}).fairness_id) == 256
