"""GET /v1/models: the base model and every adapter served on it (`parent` names the base)."""

from __future__ import annotations

from fastapi import APIRouter

from posttrain.serve.dependencies import State
from posttrain.serve.error_responses import documented

router = APIRouter(responses=documented(401))


@router.get("/v1/models")
async def models(state: State):
    data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "posttrain",
             "root": state.base_name, "parent": None, "max_model_len": state.max_model_len}]
    for a in state.registry.list():
        data.append({"id": a.name, "object": "model", "created": a.created, "owned_by": "posttrain",
                     "root": a.name, "parent": state.base_name, "adapter_type": a.kind})
    return {"object": "list", "data": data}
