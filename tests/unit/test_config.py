"""Flags and their GATEWAY_* variables."""

from __future__ import annotations

import argparse

import pytest

from gateway_extproc.apis import INFERENCE_PATHS
from gateway_extproc.config import (
    DEFAULT_ALLOWED_PATHS,
    add_serve_arguments,
    env_name,
    settings_from_args,
    unknown_environment,
)
from gateway_extproc.models.source import source_names


def parse(argv: list[str]):
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, source_names())
    return settings_from_args(parser.parse_args(argv))


def test_env_name_follows_the_flag():
    assert env_name("--max-body-bytes") == "GATEWAY_MAX_BODY_BYTES"


def test_environment_sets_defaults_and_flags_win(monkeypatch):
    monkeypatch.setenv("GATEWAY_GRPC_PORT", "9100")
    monkeypatch.setenv("GATEWAY_DEFAULT_STRATEGY", "round-robin")
    settings = parse(["--grpc-port", "9200"])
    assert settings.grpc_port == 9200
    assert settings.default_strategy == "round-robin"


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("GATEWAY_GRPC_PORT", "ninety"),
        ("GATEWAY_GRPC_PORT", "70000"),
        ("GATEWAY_LOG_FORMAT", "xml"),
        ("GATEWAY_MAX_BODY_BYTES", "0"),
        ("GATEWAY_OTLP_ENDPOINT", "ftp://collector:4317"),
        ("GATEWAY_OTLP_ENDPOINT", "collector"),
        ("GATEWAY_OTLP_ENDPOINT", "http://collector:4317/v1/traces"),
        ("GATEWAY_TRACE_SAMPLE_RATIO", "1.5"),
    ],
)
def test_bad_environment_values_stop_start_up_with_the_variable_named(
    monkeypatch, capsys, var, value
):
    monkeypatch.setenv(var, value)
    with pytest.raises(SystemExit) as caught:
        parse([])
    assert caught.value.code == 2
    assert var in capsys.readouterr().err


def test_unknown_gateway_variables_are_named(monkeypatch):
    monkeypatch.setenv("GATEWAY_GRPC_PROT", "9100")  # a typo
    monkeypatch.setenv("GATEWAY_GRPC_PORT", "9100")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser, source_names())
    assert unknown_environment(parser.parse_args([])) == ["GATEWAY_GRPC_PROT"]


@pytest.mark.parametrize(
    ("argv", "env", "tls"),
    [
        (["--discovery", "inferencepool"], None, True),
        (["--discovery", "inferencepool", "--secure-serving=false"], None, False),
        (["--discovery", "inferencepool", "--secure-serving", "false"], None, False),
        (["--discovery", "inferencepool"], "false", False),
        (["--discovery", "static"], None, False),
        (["--discovery", "static", "--secure-serving"], None, True),
    ],
)
def test_secure_serving_takes_the_reference_pickers_spelling(monkeypatch, argv, env, tls):
    if env is not None:
        monkeypatch.setenv("GATEWAY_SECURE_SERVING", env)
    assert parse(argv).serves_tls is tls


def test_picker_flags_and_defaults():
    settings = parse(["--discovery", "inferencepool", "--pool-name", "p", "--conformance-mode"])
    assert (settings.pool_name, settings.pool_namespace) == ("p", "")
    assert (settings.grpc_health_port, settings.conformance_mode) == (9003, True)
    assert parse(["--conformance-mode=false"]).conformance_mode is False


def test_tracing_is_off_unless_a_collector_is_named(monkeypatch):
    assert parse([]).otlp_endpoint == ""
    assert parse(["--otlp-endpoint", "collector.observability:4317"]).otlp_endpoint == (
        "collector.observability:4317"
    )
    monkeypatch.setenv("GATEWAY_OTLP_ENDPOINT", "https://collector:4317")
    assert parse(["--trace-sample-ratio", "0.25"]).trace_sample_ratio == 0.25
    assert parse([]).otlp_endpoint == "https://collector:4317"


def test_the_processor_listens_on_loopback_unless_in_kubernetes_or_told(monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("GATEWAY_LISTEN_HOST", raising=False)
    assert parse([]).listen_host == "127.0.0.1"
    assert parse(["--listen-host", "0.0.0.0"]).listen_host == "0.0.0.0"
    monkeypatch.setenv("GATEWAY_LISTEN_HOST", "::")
    assert parse([]).listen_host == "::"
    monkeypatch.delenv("GATEWAY_LISTEN_HOST")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.96.0.1")
    assert parse([]).listen_host == "0.0.0.0"


def test_the_inference_paths_are_routed_by_default():
    assert parse([]).allowed_paths == DEFAULT_ALLOWED_PATHS
    assert set(DEFAULT_ALLOWED_PATHS) == set(INFERENCE_PATHS)


def test_allowed_paths_take_a_list_with_prefixes(monkeypatch):
    settings = parse(["--allowed-paths", " /v1/chat/completions, /v1/audio/* ,"])
    assert settings.allowed_paths == ("/v1/chat/completions", "/v1/audio/*")
    monkeypatch.setenv("GATEWAY_ALLOWED_PATHS", "/v1/completions")
    assert parse([]).allowed_paths == ("/v1/completions",)


@pytest.mark.parametrize("value", ["", "v1/chat", "/v1/*/x", "/v1/chat?x=1"])
def test_bad_allowed_paths_stop_start_up(value, capsys):
    with pytest.raises(SystemExit):
        parse(["--allowed-paths", value])
    assert "--allowed-paths" in capsys.readouterr().err
