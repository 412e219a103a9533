"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's names): adapters added and removed
while serving, only on a server started with --allow-runtime-adapters and only from its --adapter-dir
folders; the operator's own adapters cannot be unloaded (403)."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool

from posttrain.inference.request_errors import AdapterError, RequestError
from posttrain.inference.registry import validate_name
from posttrain.serve.dependencies import State, runtime_adapters_allowed
from posttrain.serve.error_responses import documented
from posttrain.serve.protocol import LoadAdapterRequest, UnloadAdapterRequest

router = APIRouter(dependencies=[Depends(runtime_adapters_allowed)], responses=documented(400, 401, 403, 404, 413))


@router.post("/v1/load_lora_adapter")
async def load_adapter(body: LoadAdapterRequest, state: State):
    validate_name(body.lora_name)
    try:  # reading and checking the adapter's files: off the event loop
        adapter = await run_in_threadpool(state.registry.add, body.lora_name, body.lora_path, runtime=True)
    except AdapterError as err:
        raise RequestError(str(err), param="lora_path") from None
    return {"object": "adapter", "id": adapter.name, "parent": state.base_name, "adapter_type": adapter.kind,
            "status": "loaded"}


@router.post("/v1/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapterRequest, state: State):
    adapter = state.registry.remove(body.lora_name, runtime_only=True)  # the operator's stay
    return {"object": "adapter", "id": adapter.name, "status": "unloaded"}
