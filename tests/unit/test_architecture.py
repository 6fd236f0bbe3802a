"""The import rule: a part of gateway_extproc imports only parts below it.

LAYERS lists the parts from the top down; docs/architecture.md draws the same table.
Parts in one layer are siblings and do not import each other (routing and openai are
kept apart so routing stays free of any wire format; devtools and conformance are both
tools beside the serving code). Inside one part, modules import each other freely.
Every import counts, including the ones inside functions (cli's lazy sub-command
imports are allowed because cli is on top).

Adding a module or sub-package at the top of gateway_extproc means placing it here.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "gateway_extproc"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE

LAYERS: list[set[str]] = [
    {"cli"},
    {"devtools", "conformance", "workers"},
    {"server"},
    {"admin", "extproc"},
    # When a request may be routed (reads routing's in-flight counts, builds errors), and
    # the inference APIs' wire formats (OpenAI's, Anthropic's, built on openai/).
    {"flowcontrol", "apis"},
    {"routing", "openai"},
    {"metrics", "kvevents", "tokenize"},
    {"models"},
    # The package's own __init__ (the version) and the leaves everything may use.
    {
        "__init__",
        "config",
        "errors",
        "telemetry",
        "tracing",
        "proto_gen",
        "tls",
        "redis_sessions",
        "redis_placements",
    },
    # What the Redis-shared state above has in common.
    {"redis_channel"},
]
LAYER_OF = {part: index for index, parts in enumerate(LAYERS) for part in parts}


@dataclass(frozen=True)
class Import:
    source: Path
    line: int
    importer: str  # the part that imports
    imported: str  # the dotted module (or name) imported


def part_of(module: str, root: Path = ROOT) -> str:
    """`gateway_extproc.routing.router` -> `routing`; the package itself -> `__init__`."""
    parts = module.split(".")
    if len(parts) == 1:
        return "__init__"
    first = parts[1]
    if (root / first).is_dir() or (root / f"{first}.py").is_file():
        return first
    return "__init__"  # a name defined in gateway_extproc/__init__.py


def module_name(path: Path, root: Path) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_imports(root: Path = ROOT) -> Iterator[Import]:
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        is_package = path.name == "__init__.py"
        importer = part_of(module, root)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = module.split(".")
                    anchor = anchor if is_package else anchor[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from gateway_extproc import config` imports the module `config`.
                names = [f"{base}.{alias.name}" for alias in node.names] if base else []
            else:
                continue
            for name in names:
                if name == PACKAGE or name.startswith(PACKAGE + "."):
                    yield Import(path, node.lineno, importer, name)


def violations(root: Path = ROOT) -> list[str]:
    out = []
    for found in package_imports(root):
        imported = part_of(found.imported, root)
        if imported == found.importer:
            continue
        here, there = LAYER_OF[found.importer], LAYER_OF[imported]
        if there > here:
            continue
        why = "a sibling in its layer" if there == here else "a layer above it"
        where = found.source.relative_to(root.parent)
        out.append(
            f"{where}:{found.line}: {found.importer} imports {found.imported}, "
            f"{why} ({imported}); see docs/architecture.md"
        )
    return out


def test_every_part_of_the_package_has_a_layer():
    parts = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()}
    parts = {p for p in parts if (ROOT / p).is_dir() or (ROOT / f"{p}.py").is_file()}
    parts.discard("__pycache__")
    unplaced = sorted(parts - set(LAYER_OF))
    assert unplaced == [], f"place these in LAYERS (tests/unit/test_architecture.py): {unplaced}"


def test_imports_only_go_down():
    assert violations() == []


def test_an_upward_or_sibling_import_is_reported(tmp_path):
    """The checker itself: it sees module-level, lazy and relative imports."""
    fake = tmp_path / PACKAGE
    for folder in ("routing", "models", "openai"):
        (fake / folder).mkdir(parents=True)
        (fake / folder / "__init__.py").write_text("")
    (fake / "__init__.py").write_text("")
    (fake / "models" / "registry.py").write_text(
        "def f():\n    from gateway_extproc.routing import router\n"
    )
    (fake / "routing" / "router.py").write_text("from ..openai import errors\n")
    (fake / "routing" / "scorers.py").write_text("from gateway_extproc.models import registry\n")
    found = violations(fake)
    assert [line.split(": ", 1)[1].split(",")[0] for line in found] == [
        "models imports gateway_extproc.routing.router",
        "routing imports gateway_extproc.openai.errors",
    ]
