"""The container image recipe agrees with the chart that runs it. No Docker engine runs
here, so the Dockerfile is read, not built: base image, stages, user, entry point."""

from __future__ import annotations

import fnmatch
import json
import re
import tomllib

from tests.deploy import helpers

DOCKERFILE = helpers.ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def args() -> dict[str, str]:
    return dict(a.split("=", 1) for kind, a in instructions() if kind == "ARG" and "=" in a)


def test_multi_stage_build_on_python_slim() -> None:
    froms = [a for kind, a in instructions() if kind == "FROM"]
    assert len(froms) >= 2
    assert all(f.split()[0] == "python:3.11-slim" for f in froms)
    runs = " ".join(a for kind, a in instructions() if kind == "RUN")
    assert "pip install ." in runs
    # The processor only: Envoy comes from Envoy Gateway or the user's own proxy.
    assert "envoy" not in runs.lower()


def test_runs_as_the_non_root_user_the_chart_expects() -> None:
    (user,) = [a for kind, a in instructions() if kind == "USER"]
    uid, _, gid = re.sub(r"\$\{(\w+)\}", lambda m: args()[m.group(1)], user).partition(":")
    pod = helpers.one(helpers.render(), "Deployment")["spec"]["template"]["spec"]

    # Numeric, or the kubelet cannot check runAsNonRoot.
    assert uid.isdigit() and int(uid) > 0
    assert int(uid) == pod["securityContext"]["runAsUser"]
    assert int(gid) == pod["securityContext"]["runAsGroup"]


def test_entry_point_is_the_console_script_the_chart_calls() -> None:
    (entrypoint,) = [json.loads(a) for kind, a in instructions() if kind == "ENTRYPOINT"]
    (cmd,) = [json.loads(a) for kind, a in instructions() if kind == "CMD"]
    project = tomllib.loads((helpers.ROOT / "pyproject.toml").read_text())
    container = helpers.container(helpers.render())

    assert entrypoint == ["gateway-extproc"]
    assert "gateway-extproc" in project["project"]["scripts"]
    assert cmd == ["serve"] and container["args"][0] == "serve"
    exposed = {int(p) for kind, a in instructions() if kind == "EXPOSE" for p in a.split()}
    assert exposed == {p["containerPort"] for p in container["ports"]}


def test_dockerignore_keeps_what_the_build_copies() -> None:
    ignored = [
        line.strip()
        for line in (helpers.ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        src
        for kind, a in instructions()
        if kind == "COPY" and "--from" not in a
        for src in a.split()[:-1]
    ]
    assert {".venv", ".git"} <= set(ignored)
    for path in copied:
        assert not any(fnmatch.fnmatch(path, pattern) for pattern in ignored), path
        assert (helpers.ROOT / path).exists(), path
