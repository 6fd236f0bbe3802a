"""The OpenAI `GET /v1/models` answer, built from the model dictionary: the models in
`state`, and the aliases with a target in that state (a client may ask for them too).
`GET /v1/models/{id}` answers one of them, the same object the list holds."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import orjson

from gateway_extproc.models.registry import ModelRegistry, ModelState
from gateway_extproc.openai.requests import MODELS_PATH

OWNER = "gateway-extproc"
ANSWERED_METHODS = ("GET", "HEAD")


def models_request(method: str, path: str) -> str | None:
    """For a request the processor answers itself (GET or HEAD of `/v1/models` or
    `/v1/models/{id}`, `path` without its query): the model id asked for, "" for the
    list; None for any other request. An id may hold slashes (`org/model`), sent as is
    or percent-encoded, as clients do either."""
    if method not in ANSWERED_METHODS:
        return None
    if path == MODELS_PATH or path == MODELS_PATH + "/":
        return ""
    if path.startswith(MODELS_PATH + "/"):
        return unquote(path[len(MODELS_PATH) + 1 :])
    return None


def _model_object(name: str) -> dict[str, Any]:
    # `created` is 0: the dictionary does not know when an engine loaded a model.
    return {"id": name, "object": "model", "created": 0, "owned_by": OWNER}


def _is_listed(registry: ModelRegistry, name: str, state: ModelState) -> bool:
    if registry.lookup(name).state is state:
        return True
    alias = registry.aliases.get(name)
    return alias is not None and any(
        w and registry.lookup(t).state is state for t, w in alias.targets
    )


def models_list_body(registry: ModelRegistry, state: ModelState = ModelState.READY) -> bytes:
    names = {name for name, view in registry.models().items() if view.state is state}
    names.update(name for name in registry.aliases if _is_listed(registry, name, state))
    data = [_model_object(name) for name in sorted(names)]
    return orjson.dumps({"object": "list", "data": data})


def model_body(
    registry: ModelRegistry, name: str, state: ModelState = ModelState.READY
) -> bytes | None:
    """The model object of `name` if the list would hold it (a model or alias), else
    None: a model the list does not show is not found, as at OpenAI."""
    if not _is_listed(registry, name, state):
        return None
    return orjson.dumps(_model_object(name))
