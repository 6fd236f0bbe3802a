"""The OpenAI `GET /v1/models` answer, built from the model dictionary."""

from __future__ import annotations

import orjson

from gateway_extproc.models.registry import ModelRegistry, ModelState

OWNER = "gateway-extproc"


def models_list_body(registry: ModelRegistry, state: ModelState = ModelState.READY) -> bytes:
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": OWNER}
        for name, view in sorted(registry.models().items())
        if view.state is state
    ]
    return orjson.dumps({"object": "list", "data": data})
