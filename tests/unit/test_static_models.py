"""The static model file: parsing, rejection with a clear reason, reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gateway_extproc.models.registry import ModelRegistry, ModelState
from gateway_extproc.models.static import ModelFileError, StaticModelSource, parse_models_file

GOOD = """
models:
  - name: llama-3-8b
    pods:
      - {name: llama-0, address: 127.0.0.1:8001}
      - {name: llama-1, address: 127.0.0.1:8002, state: terminating}
  - name: qwen-2-7b
    pods:
      - {name: qwen-0, address: 127.0.0.1:8003, state: not-ready, metrics_address: 127.0.0.1:9003}
"""


def test_the_documented_example_parses_into_pods_with_states():
    pods = {p.name: p for p in parse_models_file(GOOD)}
    assert pods["llama-0"].routable
    assert pods["llama-1"].terminating
    assert not pods["qwen-0"].ready
    assert pods["qwen-0"].scrape_address == "127.0.0.1:9003"
    assert pods["llama-0"].scrape_address == "127.0.0.1:8001"


def test_a_pod_listed_under_two_models_serves_both():
    text = """
models:
  - {name: base, pods: [{name: p, address: 10.0.0.1:8000}]}
  - {name: lora, pods: [{name: p, address: 10.0.0.1:8000}]}
"""
    (only,) = parse_models_file(text)
    assert only.models == ("base", "lora")


def test_empty_file_is_an_empty_dictionary():
    assert parse_models_file("") == []


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("models: [", "not valid YAML"),
        ("- a\n- b", "mapping"),
        ("models: {a: 1}", "mapping"),
        ("modles: []", "unknown top-level keys: modles"),
        ("models: [{pods: []}]", "models[0].name"),
        ("models: [{name: m, pods: {}}]", "models[0].pods must be a list"),
        ("models: [{name: m, pods: [{name: p}]}]", "models[0].pods[0].address"),
        ("models: [{name: m, pods: [{name: p, address: 'localhost:80'}]}]", "IP address"),
        ("models: [{name: m, pods: [{name: p, address: '10.0.0.1'}]}]", "not `ip:port`"),
        ("models: [{name: m, pods: [{name: p, address: '10.0.0.1:99999'}]}]", "not `ip:port`"),
        (
            "models: [{name: m, pods: [{name: p, address: '10.0.0.1:80', state: dead}]}]",
            "models[0].pods[0].state",
        ),
        (
            "models: [{name: m, pods: [{name: p, address: '10.0.0.1:80', colour: red}]}]",
            "unknown keys: colour",
        ),
        (
            "models:\n - {name: a, pods: [{name: p, address: '10.0.0.1:80'}]}\n"
            " - {name: b, pods: [{name: p, address: '10.0.0.2:80'}]}",
            "different address",
        ),
    ],
)
def test_bad_files_are_rejected_naming_the_problem(text, named):
    with pytest.raises(ModelFileError, match=named.replace("[", r"\[").replace("]", r"\]")):
        parse_models_file(text)


def test_ipv6_addresses_are_accepted():
    (pod,) = parse_models_file("models: [{name: m, pods: [{name: p, address: '[::1]:8000'}]}]")
    assert pod.address == "[::1]:8000"


def write(path: Path, text: str) -> None:
    path.write_text(text)
    # Make sure the change is visible even on file systems with coarse timestamps.
    stamp = path.stat().st_mtime_ns + 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def test_reload_applies_changes_and_a_bad_file_keeps_the_last_good_dictionary(tmp_path, capsys):
    path = tmp_path / "models.yaml"
    write(path, GOOD)
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path))
    assert source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.READY
    assert not source.load()  # unchanged file: nothing to do

    write(
        path,
        GOOD.replace(
            "{name: llama-0, address: 127.0.0.1:8001}",
            "{name: llama-0, address: 127.0.0.1:8001, state: terminating}",
        ),
    )
    assert source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.TERMINATING

    write(path, "models: [{name: broken")
    assert not source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.TERMINATING
    captured = capsys.readouterr()
    assert "models_file_rejected" in captured.out + captured.err

    write(path, "models: []")
    assert source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.ABSENT


def test_missing_file_is_reported_and_nothing_is_synced(tmp_path, capsys):
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(tmp_path / "nope.yaml"))
    assert not source.load()
    assert not source.load()
    assert not registry.synced
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("models_file_rejected") == 1


EVENTS = """
models:
  - name: base
    tokenizer: tokenizers/base
    pods:
      - {name: p, address: 10.0.0.1:8000, kv_events: 'tcp://10.0.0.1:5557', kv_events_replay: 'tcp://10.0.0.1:5558'}
  - name: lora
    tokenizer: /abs/lora
    pods:
      - {name: p, address: 10.0.0.1:8000}
"""


def test_event_endpoints_and_tokenizer_directories_are_read(tmp_path):
    path = tmp_path / "models.yaml"
    write(path, EVENTS)
    registry = ModelRegistry()
    assert StaticModelSource(registry, str(path)).load()
    pod = registry.pod("p")
    assert pod is not None
    assert (pod.kv_events, pod.kv_events_replay) == ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558")
    assert pod.models == ("base", "lora")  # the endpoints, said once, hold for the pod
    assert registry.tokenizers == {
        "base": str(tmp_path / "tokenizers" / "base"),
        "lora": "/abs/lora",
    }
    write(path, "models: []")  # a reload replaces them
    assert StaticModelSource(registry, str(path)).load()
    assert registry.tokenizers == {}


@pytest.mark.parametrize(
    ("pod", "named"),
    [
        ("kv_events: '10.0.0.1:5557'", "not `tcp://host:port`"),
        ("kv_events: 'tcp://*:5557'", "not `tcp://host:port`"),
        ("kv_events: 'tcp://10.0.0.1:0'", "no valid port"),
        ("kv_events: 5557", "must be a string"),
        ("kv_events_replay: 'tcp://10.0.0.1:5558'", "needs kv_events"),
    ],
)
def test_bad_event_endpoints_are_rejected_naming_the_problem(pod, named):
    text = f"models: [{{name: m, pods: [{{name: p, address: '10.0.0.1:80', {pod}}}]}}]"
    with pytest.raises(ModelFileError, match=named.replace("*", r"\*")):
        parse_models_file(text)


def test_a_pod_whose_entries_disagree_on_its_endpoint_is_rejected():
    text = (
        "models:\n - {name: a, pods: [{name: p, address: '10.0.0.1:80', kv_events: 'tcp://h:1'}]}\n"
        " - {name: b, pods: [{name: p, address: '10.0.0.1:80', kv_events: 'tcp://h:2'}]}"
    )
    with pytest.raises(ModelFileError, match="different kv_events"):
        parse_models_file(text)


def test_a_tokenizer_must_be_a_path():
    with pytest.raises(ModelFileError, match=r"models\[0\].tokenizer"):
        parse_models_file("models: [{name: m, tokenizer: 3, pods: []}]")
