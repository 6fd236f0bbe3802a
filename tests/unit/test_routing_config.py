"""The routing config file: the shipped example builds, every kind of mistake is refused
with one line naming it, and `serve` stops on one with that line and a non-zero exit,
no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gateway_extproc.routing.catalog import build_catalog
from gateway_extproc.routing.config import load_routing_config, parse_routing_config
from gateway_extproc.routing.inflight import InFlightCounter
from gateway_extproc.routing.pickers import MaxScorePicker, WeightedRandomPicker
from gateway_extproc.routing.profile import Profile
from gateway_extproc.routing.registry import RoutingConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "routing.yaml"


def test_the_example_builds_every_profile_it_declares() -> None:
    config = load_routing_config(str(EXAMPLE))
    assert config.default == "cache-aware"
    catalog = build_catalog(None, InFlightCounter(), routing=config)
    for name in config.profiles:
        assert name in catalog.names()
    kv_spread = catalog.resolve("kv-spread")
    sticky = catalog.resolve("sticky-latency")
    assert isinstance(kv_spread, Profile) and isinstance(sticky, Profile)
    assert isinstance(kv_spread.picker, WeightedRandomPicker)
    assert isinstance(sticky.picker, MaxScorePicker) and sticky.sessions is not None
    assert sticky.picker._tolerance == 0.05


def build(text: str) -> None:
    config = parse_routing_config(yaml.safe_load(text), "routing.yaml")
    build_catalog(None, InFlightCounter(), routing=config)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[1, 2]", "expected a mapping with `profiles`"),
        ("profiles: {a: 1}", "`profiles` must be a list"),
        ("profile: []", "unknown key 'profile'"),
        ("profiles: [{scorers: [least-request]}]", "profiles[0]: `name` must be"),
        ("profiles: [{name: Fast, scorers: [least-request]}]", "not 'Fast'"),
        ("profiles: [{name: 'a:b', scorers: [least-request]}]", "not 'a:b'"),
        ("profiles: [{name: random}]", "profile 'random' is a built-in profile"),
        (
            "profiles: [{name: a, scorers: [least-request]}, {name: a, scorers: [throughput]}]",
            "profile 'a' is declared twice",
        ),
        ("profiles: [{name: a, scorer: [least-request]}]", "profile 'a': unknown key 'scorer'"),
        ("profiles: [{name: a, scorers: [nope]}]", "scorers[0]: unknown scorer 'nope'; known:"),
        ("profiles: [{name: a, scorers: least-request}]", "`scorers` must be a list"),
        (
            "profiles: [{name: a, scorers: [{name: least-request, weight: 0}]}]",
            "weight of 'least-request' must be a finite number above 0, not 0",
        ),
        (
            "profiles: [{name: a, scorers: [{name: least-request, weight: .nan}]}]",
            "must be a finite number above 0",
        ),
        (
            "profiles: [{name: a, scorers: [{name: least-request, weight: heavy}]}]",
            "not 'heavy'",
        ),
        (
            "profiles: [{name: a, scorers: [least-request, {name: least-request}]}]",
            "scorer 'least-request' is listed twice",
        ),
        ("profiles: [{name: a, picker: best, scorers: [throughput]}]", "unknown picker 'best'"),
        ("profiles: [{name: a, filters: [healthy]}]", "filters[0]: unknown filter 'healthy'"),
        (
            "profiles: [{name: a, session-affinity: yes please, scorers: [throughput]}]",
            "`session-affinity` must be true or false",
        ),
        ("profiles: [{name: a}]", "picker 'max-score': the max-score picker needs at least"),
        (
            "profiles: [{name: a, picker: random, scorers: [throughput]}]",
            "profile 'a': picker 'random': the random picker takes no scorers",
        ),
        (
            "profiles: [{name: a, scorers: [{name: prefix-cache, params: {gap: 4}}]}]",
            "scorer 'prefix-cache': got an unexpected keyword argument 'gap'",
        ),
        (
            "profiles: [{name: a, scorers: [least-request], picker: "
            "{name: max-score, params: {tolerance: 2}}}]",
            "picker 'max-score': tolerance must be in [0, 1)",
        ),
        (
            "profiles: [{name: a, scorers: [{name: throughput, params: [1]}]}]",
            "`params` must be a mapping",
        ),
        ("default: fastest", "default 'fastest' is not a profile; known: least-kv-cache"),
    ],
)
def test_mistakes_are_refused_with_one_line_naming_them(text: str, problem: str) -> None:
    with pytest.raises(RoutingConfigError) as caught:
        build(text)
    message = str(caught.value)
    assert message.startswith("routing config routing.yaml: ")
    assert problem in message
    assert "\n" not in message


def test_unreadable_or_broken_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(RoutingConfigError, match=r"routing config .*missing\.yaml: cannot read it"):
        load_routing_config(str(tmp_path / "missing.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("profiles:\n  - name: a\n    scorers: [least-request\n")
    with pytest.raises(RoutingConfigError, match=r"broken\.yaml: not valid YAML at line"):
        load_routing_config(str(broken))


def test_serve_stops_on_a_bad_routing_config_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "routing.yaml"
    bad.write_text("profiles:\n  - name: fast\n    scorers: [{name: least-request, weight: -1}]\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway_extproc.cli",
            "serve",
            "--routing-config",
            str(bad),
            "--listen-host",
            "127.0.0.1",
            "--grpc-port",
            "0",
            "--admin-port",
            "0",
            "--discovery",
            "static",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if "gateway_failed_to_start" in line]
    assert len(lines) == 1, output
    problem = json.loads(lines[0])["problem"]
    assert problem == (
        f"routing config {bad}: profile 'fast': scorers[0]: "
        "weight of 'least-request' must be a finite number above 0, not -1"
    )
