"""The generation engine: KV cache, sampling, continuous batching, multi-LoRA and prompt adapters.

`Engine` (engine.py) is the entry point for servers and RL rollouts; `generate` (generate.py) is
the one-call helper for chat and evaluation.
"""
