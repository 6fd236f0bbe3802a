"""Validating custom resources the way the API server does, from the published CRDs.

A CRD's `openAPIV3Schema` is a *structural* schema (Kubernetes API conventions), which is
close to, but not, JSON Schema. What the API server does with an object on create, and
what this module does with it:

1. **Defaulting**: `default` values are filled in for absent fields, before validation
   (`apply_defaults`).
2. **Pruning**: a field the schema does not name is dropped, unless the node says
   `x-kubernetes-preserve-unknown-fields: true` (or is a map: `additionalProperties`).
   `kubectl apply` with strict field validation refuses it instead; either way the
   setting is lost, so here it is an error (`additionalProperties: false` exactly where
   pruning would happen, including objects that name no properties at all).
3. **Schema validation**: types, enums, patterns, bounds, `required`, with
   `x-kubernetes-int-or-string` as integer-or-string, `nullable` as null-allowed, and
   `x-kubernetes-list-type: set` as unique items. Logical junctors (`anyOf`, `allOf`,
   `oneOf`, `not`) only carry value validations in a structural schema, so they are kept
   as they are, never made strict.
4. **CEL rules** (`x-kubernetes-validations`): every rule on a node present in the object
   is evaluated (cel-python), with `self` bound to that node after defaulting; a false
   result or an evaluation error is a failure with the rule's message. Transition rules
   (those reading `oldSelf`) need an old object and are skipped, as on create.

Not checked: string formats (`date-time`, `byte`...), `x-kubernetes-list-type: map` key
uniqueness, and the root `metadata`, which callers validate as a Kubernetes ObjectMeta.
"""

from __future__ import annotations

import copy
import ipaddress
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import celpy
import jsonschema
from celpy import celtypes

_DROPPED = ("description", "default", "example", "externalDocs")
_JUNCTORS = ("anyOf", "allOf", "oneOf", "not")


# -- JSON Schema ---------------------------------------------------------------------------


def to_json_schema(node: dict[str, Any], *, root: bool = True) -> dict[str, Any]:
    """The JSON Schema that accepts what the API server keeps and accepts (see doc)."""
    out: dict[str, Any] = {
        k: v
        for k, v in node.items()
        if not k.startswith("x-kubernetes-")
        and k not in _DROPPED
        and k not in ("properties", "items", "additionalProperties", "nullable", *_JUNCTORS)
    }
    if node.get("x-kubernetes-int-or-string"):
        out["type"] = ["integer", "string"]
    if node.get("nullable") and "type" in out:
        out["type"] = [*_as_list(out["type"]), "null"]
    for junctor in _JUNCTORS:
        if junctor in node:
            out[junctor] = _without_extensions(node[junctor])
    if node.get("x-kubernetes-list-type") == "set":
        out["uniqueItems"] = True
    if "items" in node:
        out["items"] = to_json_schema(node["items"], root=False)
    properties = dict(node.get("properties") or {})
    if node.get("x-kubernetes-embedded-resource"):
        implicit = (("apiVersion", "string"), ("kind", "string"), ("metadata", "object"))
        for name, kind in implicit:
            loose = {"type": kind, "x-kubernetes-preserve-unknown-fields": True}
            properties.setdefault(name, loose)
    if properties:
        out["properties"] = {
            name: (
                {"type": "object"}  # ObjectMeta: validated as such by the caller
                if root and name == "metadata"
                else to_json_schema(child, root=False)
            )
            for name, child in properties.items()
        }
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = to_json_schema(node["additionalProperties"], root=False)
    elif "additionalProperties" in node:
        out["additionalProperties"] = node["additionalProperties"]
    elif node.get("type") == "object" and not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False  # what pruning would drop
    return out


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _without_extensions(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: _without_extensions(v)
            for k, v in value.items()
            if not k.startswith("x-kubernetes-") and k not in _DROPPED
        }
    if isinstance(value, list):
        return [_without_extensions(v) for v in value]
    return value


# -- defaulting ----------------------------------------------------------------------------


def apply_defaults(value: Any, node: dict[str, Any]) -> Any:
    """`value` with the schema's defaults filled in where fields are absent (a copy)."""
    value = copy.deepcopy(value)
    _default_into(value, node)
    return value


def _default_into(value: Any, node: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for name, child in (node.get("properties") or {}).items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                _default_into(value[name], child)
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            named = node.get("properties") or {}
            for name, child_value in value.items():
                if name not in named:
                    _default_into(child_value, extra)
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for item in value:
            _default_into(item, node["items"])


# -- CEL -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleFailure:
    path: str
    message: str
    rule: str


def cel_failures(value: Any, node: dict[str, Any], path: str = "") -> list[RuleFailure]:
    """Every CEL rule of `node` and its present descendants that `value` breaks."""
    failures: list[RuleFailure] = []
    for location, current, schema in _present_nodes(value, node, path):
        for rule in schema.get("x-kubernetes-validations") or ():
            expression = rule["rule"]
            if re.search(r"\boldSelf\b", expression):
                continue  # a transition rule: nothing to compare with on create
            message = rule.get("message") or f"failed rule: {expression}"
            try:
                ok = _evaluate(expression, current, schema)
            except Exception as exc:  # an evaluation error fails validation, as in k8s
                failures.append(RuleFailure(location, f"{message} (error: {exc})", expression))
                continue
            if ok is not True:
                failures.append(RuleFailure(location, message, expression))
    return failures


def _present_nodes(
    value: Any, node: dict[str, Any], path: str
) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    yield path or "<root>", value, node
    if isinstance(value, dict):
        named = node.get("properties") or {}
        for name, child in named.items():
            if name in value:
                yield from _present_nodes(value[name], child, f"{path}/{name}")
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            for name, child_value in value.items():
                if name not in named:
                    yield from _present_nodes(child_value, extra, f"{path}/{name}")
    elif isinstance(value, list) and isinstance(node.get("items"), dict):
        for index, item in enumerate(value):
            yield from _present_nodes(item, node["items"], f"{path}/{index}")


def _evaluate(expression: str, value: Any, schema: dict[str, Any]) -> Any:
    program = _program(expression)
    result = program.evaluate({"self": _to_cel(value, schema)})
    if isinstance(result, Exception):
        raise result
    return bool(result) if isinstance(result, celtypes.BoolType) else result


@cache
def _program(expression: str) -> celpy.Runner:
    environment = celpy.Environment()
    return environment.program(environment.compile(expression), functions=_KUBERNETES_LIBRARY)


def _to_cel(value: Any, schema: dict[str, Any]) -> Any:
    """JSON to CEL values; integers stay integers (JSON has no int/double split)."""
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int):
        if schema.get("type") == "number":
            return celtypes.DoubleType(value)
        return celtypes.IntType(value)
    if isinstance(value, float):
        return celtypes.DoubleType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    if isinstance(value, list):
        items = schema.get("items") or {}
        return celtypes.ListType([_to_cel(v, items) for v in value])
    if isinstance(value, dict):
        named = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        extra = extra if isinstance(extra, dict) else {}
        return celtypes.MapType(
            {celtypes.StringType(k): _to_cel(v, named.get(k, extra)) for k, v in value.items()}
        )
    if value is None:
        return None
    raise TypeError(f"not a JSON value: {value!r}")


# The few functions of the Kubernetes CEL libraries these CRDs use beyond standard CEL.
def _split(text: Any, separator: Any, limit: Any = None) -> celtypes.ListType:
    parts = str(text).split(str(separator)) if limit is None else _split_n(text, separator, limit)
    return celtypes.ListType([celtypes.StringType(p) for p in parts])


def _split_n(text: Any, separator: Any, limit: Any) -> list[str]:
    count = int(limit)
    if count == 0:
        return []
    return str(text).split(str(separator), count - 1 if count > 0 else -1)


def _substring(text: Any, start: Any, end: Any = None) -> celtypes.StringType:
    return celtypes.StringType(str(text)[int(start) : None if end is None else int(end)])


def _upper_ascii(text: Any) -> celtypes.StringType:
    return celtypes.StringType("".join(c.upper() if c.isascii() else c for c in str(text)))


def _is_ip(text: Any) -> celtypes.BoolType:
    try:
        ipaddress.ip_address(str(text))
    except ValueError:
        return celtypes.BoolType(False)
    return celtypes.BoolType(True)


_KUBERNETES_LIBRARY = {
    "split": _split,
    "substring": _substring,
    "upperAscii": _upper_ascii,
    "isIP": _is_ip,
}


# -- all together --------------------------------------------------------------------------


@dataclass
class CustomResourceSchema:
    """One served version of one CRD, ready to check objects."""

    api_version: str
    kind: str
    schema: dict[str, Any]
    json_schema: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.json_schema = to_json_schema(self.schema)

    def problems(self, obj: dict[str, Any]) -> list[str]:
        """What the API server would refuse (or silently drop) in `obj`; empty if valid."""
        defaulted = apply_defaults(obj, self.schema)
        validator = jsonschema.Draft7Validator(self.json_schema)
        found = [
            f"{'/'.join(str(p) for p in error.absolute_path)}: {error.message}"
            for error in sorted(validator.iter_errors(defaulted), key=lambda e: e.path)
        ]
        if found:
            return found  # CEL rules assume a schema-valid object
        return [f"{f.path}: {f.message}" for f in cel_failures(defaulted, self.schema)]


def schemas_of(crd: dict[str, Any]) -> list[CustomResourceSchema]:
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    return [
        CustomResourceSchema(f"{group}/{v['name']}", kind, v["schema"]["openAPIV3Schema"])
        for v in crd["spec"]["versions"]
        if v.get("served", True)
    ]
