"""The vLLM side of the vllm backend: a worker run by the Python of an environment that has vLLM.

    $VLLM_PYTHON vllm_worker.py        (started by vllm_backend.py; not a user command)

It imports only the standard library and vLLM, so vLLM may live in an environment of its own (its
pins clash with ours on CPU: `make vllm`). It speaks JSON lines: one request on stdin, one reply on
the stdout it started with (vLLM's own prints go to stderr). Requests, by "op":

  start     {"model", "dtype", "max_model_len", "max_num_seqs", "seed", "enable_lora", "max_lora_rank",
             "max_loras", "gpu_memory_utilization", "enable_sleep_mode"}
                                                             -> {"ok": true, "version": vllm.__version__}
  generate  {"prompts": [[ids]], "params": [{...}], "lora": {"name", "id", "path"} | null,
             "loras": [one such adapter or null per prompt] | null}
            -> {"ok": true, "completions": [{"token_ids", "finish_reason", "logprobs": [[lp, [[id, lp]...]]]}]}
  reload    {"path"}: the model's weights from that folder's safetensors (all of them), then the prefix
            cache reset, so no cached prompt keeps the old weights' keys and values
  adapter   {"name", "id", "path"}: a LoRA version to generate with; the previous one is dropped
  sleep     {"level"}: vLLM gives its GPU memory back while the trainer trains (sleep mode, CUDA only): level 1
            keeps the weights in host memory (a LoRA actor's base, which never changes), level 2 drops them
            (a full model, reloaded after every update anyway). The next op that needs the engine wakes it:
            reload wakes the weights alone and loads the new ones into them (no copy of the old); generate and
            adapter wake all of it (after a level-2 sleep with no reload since, the last weights are read again).
  close     ends the worker; so does the end of stdin (the trainer died)

Every failure is a reply {"ok": false, "error": "..."}, never a traceback on the protocol stream.
"""

import json
import os
import sys


def _protocol_stream():
    """The original stdout for replies; fd 1 then points at stderr, for vLLM's (and its children's) output."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return out


def _retie_lm_head(worker):
    """Runs in vLLM's model process after a reload. A tied output head is not in the checkpoint, and the
    in-place reload puts its previous tensor back, so it would keep the old embedding: tie it again, and redo
    what vLLM derives from the weight after loading."""
    model = worker.model_runner.get_model()
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head"):
        head = model.lm_head
        head.weight = model.model.embed_tokens.weight
        head.quant_method.process_weights_after_loading(head)  # on CPU: the packed matmul of the new weight


class Worker:
    def __init__(self):
        self.llm = None
        self.lora = None  # the LoRARequest generated with, if any
        self.weights_path = None  # the folder the weights were last loaded from
        self.asleep = set()  # what a sleep released and no op has woken yet: "weights", "kv_cache"
        self.sleep_level = 0

    def start(self, model, dtype="float32", max_model_len=2048, max_num_seqs=64, seed=0, enable_lora=False,
              max_lora_rank=16, max_loras=1, gpu_memory_utilization=0.3, enable_sleep_mode=False):
        from vllm import LLM

        kwargs = dict(model=model, dtype=dtype, max_model_len=max_model_len, max_num_seqs=max_num_seqs, seed=seed,
                      skip_tokenizer_init=True, enable_prefix_caching=True)
        if enable_lora:
            kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=max_loras)
        if enable_sleep_mode:
            from vllm.platforms import current_platform

            if not current_platform.is_sleep_mode_available():
                raise ValueError(f"vLLM has no sleep mode on this platform ({current_platform.device_name}); it "
                                 "needs a CUDA or ROCm GPU")
            kwargs["enable_sleep_mode"] = True
        import torch

        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        else:  # on CPU, compiling the model costs most of a minute at every start and gains little for small ones
            kwargs["enforce_eager"] = True
        self.llm = LLM(**kwargs)
        self.weights_path = model
        import vllm

        return {"version": vllm.__version__}

    def generate(self, prompts, params, lora=None, loras=None):
        """`lora`: switch the adapter every request uses (and later ones); `loras`: one adapter (or null) per
        request, for this call only (a multi-adapter batch, as a server runs)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        self._wake()
        sampling = [SamplingParams(detokenize=False, **p) for p in params]
        request = self.lora
        if lora is not None:
            self.adapter(**lora)
            request = self.lora
        if loras is not None:
            request = [LoRARequest(x["name"], x["id"], x["path"]) if x else None for x in loras]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sampling, lora_request=request,
                                 use_tqdm=False)
        done = []
        for out in outs:
            c = out.outputs[0]
            logprobs = []
            for token, position in zip(c.token_ids, c.logprobs or []):
                ranked = sorted(((t, lp.logprob) for t, lp in position.items() if t != token or lp.rank == 1),
                                key=lambda x: -x[1])
                logprobs.append([position[token].logprob, ranked])
            done.append({"token_ids": list(c.token_ids), "finish_reason": c.finish_reason, "logprobs": logprobs})
        return {"completions": done}

    def reload(self, path):
        self._wake_weights(refill=False)  # memory for the weights, which this load fills
        self._load(path)
        if "kv_cache" not in self.asleep:  # an asleep cache holds nothing; it is reset when it wakes
            self.llm.reset_prefix_cache()
        return {}

    def _load(self, path):
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        self.llm.collective_rpc(_retie_lm_head)
        self.weights_path = path

    def sleep(self, level):
        if not self.asleep:
            self.llm.sleep(level=level)
            self.asleep, self.sleep_level = {"weights", "kv_cache"}, level
        return {}

    def _wake_weights(self, refill: bool):
        if "weights" in self.asleep:
            self.llm.wake_up(tags=["weights"])
            self.asleep.discard("weights")
            if refill and self.sleep_level == 2:  # dropped, not kept: the memory is back but holds nothing
                self._load(self.weights_path)

    def _wake(self):
        self._wake_weights(refill=True)
        if "kv_cache" in self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep.discard("kv_cache")
            self.llm.reset_prefix_cache()  # the blocks' contents are gone: no prompt may match them

    def adapter(self, name, id, path):
        from vllm.lora.request import LoRARequest

        self._wake()
        previous = self.lora
        self.lora = LoRARequest(name, id, path)
        if previous is not None and previous.lora_int_id != id:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
        self.llm.reset_prefix_cache()
        return {}


def main():
    out = _protocol_stream()
    worker = Worker()
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.pop("op")
            if op == "close":
                out.write(json.dumps({"ok": True}) + "\n")
                break
            if op not in ("start", "generate", "reload", "adapter", "sleep"):
                raise ValueError(f"unknown op {op!r}")
            reply = getattr(worker, op)(**request)
            out.write(json.dumps({"ok": True, **reply}) + "\n")
        except Exception as e:  # the trainer raises it with the reason; the worker stays up for the next request
            out.write(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
