"""One generation interface for RL rollouts, evaluation, `chat`, `compare` and the quickstart.

backend.py holds the protocol and `open_backend`, which picks an implementation:
- engine: the built-in engine (inference/engine.py) over the live model: KV cache, continuous
  batching, LoRA and prompt-learning adapters; Llama, Mistral and Qwen2 only;
- vllm: vLLM in a worker process of its own environment (vllm_backend.py, vllm_worker.py);
- hf: transformers' `generate`, for every model the engine does not cover.
"""
