"""The static model file: parsing, rejection with a clear reason, reload on change."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from gateway_extproc.models import static
from gateway_extproc.models.registry import ModelRegistry, ModelState
from gateway_extproc.models.static import ModelFileError, StaticModelSource, parse_models_file
from tests.waiting import eventually

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


def test_models_list_empty_is_an_empty_dictionary():
    assert parse_models_file("models: []") == []


@pytest.mark.parametrize("text", ["", "\n  \n", "# nothing here yet\n"])
def test_an_empty_file_is_a_bad_file_not_an_empty_dictionary(text):
    # Most likely caught while being written: taken as "no models" it would answer 404
    # to every request.
    with pytest.raises(ModelFileError, match="the file is empty"):
        parse_models_file(text)


# Flow style is refused before parsing (PyYAML's scanner is quadratic in the depth);
# block style reaches the parser's recursion limit.
DEEPLY_NESTED = [
    "models: " + "[" * 20_000,
    "models: " + "[x, " * 2_000,
    "models:\n  " + "- " * 3_000,
]


@pytest.mark.parametrize("text", DEEPLY_NESTED)
def test_a_deeply_nested_file_is_rejected_naming_the_problem(text):
    with pytest.raises(ModelFileError, match="nested too deeply"):
        parse_models_file(text)


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


async def test_reload_applies_changes_and_a_bad_file_keeps_the_last_good_dictionary(
    tmp_path, capsys
):
    path = tmp_path / "models.yaml"
    write(path, GOOD)
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path))
    assert await source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.READY
    assert not await source.load()  # unchanged file: nothing to do

    write(
        path,
        GOOD.replace(
            "{name: llama-0, address: 127.0.0.1:8001}",
            "{name: llama-0, address: 127.0.0.1:8001, state: terminating}",
        ),
    )
    assert await source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.TERMINATING

    write(path, "models: [{name: broken")
    assert not await source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.TERMINATING
    captured = capsys.readouterr()
    assert "models_file_rejected" in captured.out + captured.err

    write(path, "models: []")
    assert await source.load()
    assert registry.lookup("llama-3-8b").state is ModelState.ABSENT


async def test_missing_file_is_reported_and_nothing_is_synced(tmp_path, capsys):
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(tmp_path / "nope.yaml"))
    assert not await source.load()
    assert not await source.load()
    assert not registry.synced
    captured = capsys.readouterr()
    assert (captured.out + captured.err).count("models_file_rejected") == 1


def rejections(captured) -> list[str]:
    lines = (captured.out + captured.err).splitlines()
    return [line for line in lines if "models_file_rejected" in line]


async def test_a_missing_file_at_start_says_no_dictionary_is_in_force(tmp_path, capsys):
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(tmp_path / "nope.yaml"), interval=60)
    await source.start()
    try:
        (rejected,) = rejections(capsys.readouterr())
        assert "stays in force" not in rejected
        assert "no dictionary is in force yet" in rejected
        assert "has not loaded" in registry.problem
    finally:
        await source.stop()


async def test_a_file_caught_half_written_is_read_again_not_taken_as_a_subset(tmp_path):
    path = tmp_path / "models.yaml"
    write(path, GOOD)
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path))
    assert await source.load()
    # The writer has put down the first model only when the file is first read, and
    # finishes it before the second read.
    half = GOOD[: GOOD.index("  - name: qwen-2-7b")]
    finished = GOOD.replace("qwen-2-7b", "qwen-2-7b-v2")
    write(path, half)
    real_read = source._read

    def writer_finishes_after_the_first_read() -> str:
        text = real_read()
        if text == half:
            write(path, finished)
        return text

    source._read = writer_finishes_after_the_first_read  # type: ignore[method-assign]
    assert not await source.load()
    assert registry.lookup("qwen-2-7b").state is ModelState.UNAVAILABLE  # not dropped
    assert registry.problem == ""  # not a bad file: a file being written
    assert await source.load()
    assert registry.lookup("qwen-2-7b-v2").state is ModelState.UNAVAILABLE
    assert registry.lookup("qwen-2-7b").state is ModelState.ABSENT


@pytest.mark.parametrize(
    ("bad", "named"),
    [
        *((text, "nested too deeply") for text in DEEPLY_NESTED),
        ("", "the file is empty"),
        ("models: [{name: m, pods: [{name: p, address: '10.0.0.1:80'}]}]\nx: 2001-13-14", "month"),
    ],
)
async def test_the_watcher_outlives_a_bad_file_and_applies_the_next_good_one(
    tmp_path, capsys, bad, named
):
    path = tmp_path / "models.yaml"
    write(path, GOOD)
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path), interval=0.05, settle=0.01)
    failures = REGISTRY.get_sample_value("gateway_models_reload_failures_total") or 0
    await source.start()
    try:
        assert registry.lookup("llama-3-8b").state is ModelState.READY
        write(path, bad)
        await eventually(lambda: registry.problem, what="the bad file rejected")
        assert named in registry.problem and "stays in force" in registry.problem
        assert registry.lookup("llama-3-8b").state is ModelState.READY  # the last good one
        assert REGISTRY.get_sample_value("gateway_models_reload_failing") == 1
        after = REGISTRY.get_sample_value("gateway_models_reload_failures_total")
        assert after == failures + 1
        (rejected,) = rejections(capsys.readouterr())
        assert named in rejected

        write(path, "models: []")
        await eventually(lambda: not registry.problem, what="the next good file applied")
        assert registry.lookup("llama-3-8b").state is ModelState.ABSENT
        assert REGISTRY.get_sample_value("gateway_models_reload_failing") == 0
    finally:
        await source.stop()


async def test_an_unexpected_error_while_reloading_is_a_rejected_version(tmp_path, monkeypatch):
    path = tmp_path / "models.yaml"
    write(path, GOOD)
    registry = ModelRegistry()
    source = StaticModelSource(registry, str(path), settle=0)
    assert await source.load()

    def broken(*_: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(static, "parse_models", broken)
    write(path, "models: []")
    assert not await source.load()  # and does not raise
    assert "RuntimeError: a bug" in registry.problem
    monkeypatch.undo()
    write(path, "models: []\n")
    assert await source.load()
    assert registry.problem == ""


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


async def test_event_endpoints_and_tokenizer_directories_are_read(tmp_path):
    path = tmp_path / "models.yaml"
    write(path, EVENTS)
    registry = ModelRegistry()
    assert await StaticModelSource(registry, str(path)).load()
    pod = registry.pod("p")
    assert pod is not None
    assert (pod.kv_events, pod.kv_events_replay) == ("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558")
    assert pod.models == ("base", "lora")  # the endpoints, said once, hold for the pod
    assert registry.tokenizers == {
        "base": str(tmp_path / "tokenizers" / "base"),
        "lora": "/abs/lora",
    }
    write(path, "models: []")  # a reload replaces them
    assert await StaticModelSource(registry, str(path)).load()
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
