"""The OpenAI `GET /v1/models` answer, built from the model dictionary: the models in
`state`, and the aliases with a target in that state (a client may ask for them too)."""

from __future__ import annotations

import orjson

from gateway_extproc.models.registry import ModelRegistry, ModelState

OWNER = "gateway-extproc"


def models_list_body(registry: ModelRegistry, state: ModelState = ModelState.READY) -> bytes:
    names = {name for name, view in registry.models().items() if view.state is state}
    for name, alias in registry.aliases.items():
        if any(w and registry.lookup(t).state is state for t, w in alias.targets):
            names.add(name)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": OWNER} for name in sorted(names)
    ]
    return orjson.dumps({"object": "list", "data": data})
