"""vLLM as a generation backend: a worker process (vllm_worker.py) run by the Python of an environment
that has vLLM, fed token ids and sampling parameters, answering token ids and log-probs.

vLLM gets the starting weights once, as a folder this backend writes (so it generates from exactly
the model in memory, resumed or not); after each update `update_weights` sends the trained weights:
a full model's as safetensors reloaded in place (`reload_weights`), a LoRA model's adapter alone,
loaded as a new LoRA version (no merge). vLLM's prefix cache is reset after each, so no cached prompt
keeps the old weights' keys and values. With `enable_sleep_mode` (a GPU shared with training) vLLM gives
its memory back after every batch of samples and takes it again at the next update or batch (the
worker's `sleep` op says how). Text is decoded here, by the trainer's tokenizer, as the engine
decodes it; every request gets a seed (drawn from the backend's seed when it has none), so a run's
samples repeat.

Where vLLM's Python is: the `python` option (`vllm_python` key), else $POSTTRAIN_VLLM_PYTHON, else this
Python when it can import vllm. On a CPU machine vLLM's CPU build lives in its own environment
(`make vllm`): its pins clash with this package's.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from posttrain.errors import ConfigError, PosttrainError
from posttrain.generation.backend import Completion, stop_ids_of
from posttrain.generation.vllm_process import end_group, start_group
from posttrain.inference.detokenize import decode_continuation
from posttrain.inference.sampling import SamplingParams, TokenChoice

log = logging.getLogger(__name__)

WORKER = Path(__file__).with_name("vllm_worker.py")
SLEEP_NEEDS_GPU = ("vllm_enable_sleep_mode frees the GPU memory vLLM holds while the actor trains; it needs the "
                   "model on a CUDA GPU: leave it off on CPU")
NO_VLLM = ("rollout_backend: vllm needs vLLM: `make vllm` sets up its CPU build (then set vllm_python: "
           ".venv-vllm/bin/python, or $POSTTRAIN_VLLM_PYTHON), or `pip install vllm` on a GPU machine")
# logged at every weight update: vLLM reloads a folder without the tied output head, and says so for the head and
# for the rotary embedding
ROUTINE_LOG = ("Loading safetensors checkpoint shards", "ParallelLMHead: Failed to load weights",
               "RotaryEmbedding: Failed to load weights")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM's LoRA kernels are built for


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM builds its LoRA kernels for that holds `rank`."""
    return next((r for r in LORA_RANKS if r >= rank), rank)


def vllm_env(kv_cache_gib: int = 1) -> dict:
    """The environment a vLLM process starts with: ours, without what points Python at this package's
    environment, and a KV cache sized for this machine (vLLM's CPU default takes a whole NUMA node)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib))
    return env


def find_vllm_python(explicit: str | None = None) -> str | None:
    """The Python that runs vLLM, or None when there is none."""
    if explicit:
        found = shutil.which(os.path.expanduser(explicit))  # a path (~ too), or a name on PATH
        if found is None:
            raise ConfigError(f"vllm_python: {explicit} is not an executable Python; run `make vllm` or point it at "
                              "the python of an environment with vLLM")
        # Absolute: the worker starts in a folder of its own, where a relative path reaches nothing. Not resolved:
        # a venv's python is a symlink, and only through the venv's own path does it see the venv's packages.
        return os.path.abspath(found)
    env = os.environ.get("POSTTRAIN_VLLM_PYTHON")
    if env:
        return find_vllm_python(env)
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


def check_vllm_config(config) -> None:
    """A run asking for vLLM rollouts (or for vLLM's sleep mode): vLLM is there, and the actor is one vLLM can
    sample as trained."""
    if config.vllm_enable_sleep_mode and not _gpu_for_rollouts(config):
        raise ConfigError(SLEEP_NEEDS_GPU)
    explicit = config.rollout_backend == "vllm"
    asked = "rollout_backend: vllm" if explicit else "vllm_enable_sleep_mode"
    if find_vllm_python(config.vllm_python) is None:
        raise ConfigError(NO_VLLM.replace("rollout_backend: vllm", asked))
    if getattr(config, "use_dora", False):
        raise ConfigError(f"{asked}: vLLM has no DoRA; "
                          + ("use rollout_backend: hf" if explicit else "leave vllm_enable_sleep_mode off"))
    if getattr(config, "pissa_init", False) or getattr(config, "quantization_bit", None):
        raise ConfigError(f"{asked}: vLLM samples the full-precision original base: PiSSA (a residual base) and "
                          "QLoRA (a quantized one) would train another policy; "
                          + ("use rollout_backend: engine" if explicit else "leave vllm_enable_sleep_mode off"))


def physical_gpu(index: int, visible: str | None = None) -> str:
    """The CUDA_VISIBLE_DEVICES entry for this process's GPU `index` (itself numbered within the visible ones)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible is None else visible
    if visible:
        return [v.strip() for v in visible.split(",") if v.strip()][index]
    return str(index)


def _gpu_for_rollouts(config) -> bool:
    """Whether vLLM would sample on a GPU: this machine's, or the one Ray gives the sampler's actor."""
    if config.device == "cpu":
        return False
    if config.placement == "ray":
        return config.ray_num_gpus_per_role > 0
    return torch.cuda.is_available()


def _lora_config(model):
    """The active LoRA config of a PEFT model, None for a plain model; refuses what vLLM cannot run as the
    trainer runs it."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    config = configs[model.active_adapter]
    kind = str(getattr(config, "peft_type", "")).split(".")[-1]
    if kind != "LORA":
        raise ConfigError(f"the vllm backend runs LoRA adapters, not {kind}; use rollout_backend: engine")
    if getattr(config, "use_dora", False):
        raise ConfigError("vLLM has no DoRA: use rollout_backend: hf (or engine for plain LoRA)")
    init = getattr(config, "init_lora_weights", True)
    if isinstance(init, str) and init.startswith("pissa"):
        raise ConfigError("PiSSA trains on a residual base that vLLM would not have: use rollout_backend: engine")
    if getattr(config, "modules_to_save", None) or getattr(config, "bias", "none") != "none":
        raise ConfigError("vLLM's LoRA has no modules_to_save or LoRA biases: use rollout_backend: engine")
    return config


class VLLMBackend:
    name = "vllm"

    def __init__(self, model, tokenizer, *, seed: int | None = None, python: str | None = None,
                 gpu_memory_utilization: float = 0.3, max_model_len: int | None = None, max_num_seqs: int = 64,
                 enable_sleep_mode: bool = False):
        first = next(model.parameters())
        if enable_sleep_mode and first.device.type != "cuda":
            raise ConfigError(SLEEP_NEEDS_GPU)
        exe = find_vllm_python(python)
        if exe is None:
            raise ConfigError(NO_VLLM)
        if getattr(model, "is_quantized", False) or getattr(getattr(model, "config", None), "quantization_config",
                                                             None):
            raise ConfigError("the vllm backend samples a full-precision base; a quantized (QLoRA) actor would "
                              "train a different policy: use rollout_backend: engine")
        self.model, self.tokenizer = model, tokenizer
        self.lora = _lora_config(model)
        # after each batch: a LoRA actor's base never changes, so it waits in host memory (level 1); a full
        # model's weights are replaced at the next update, so they are dropped (level 2)
        self.sleep_level = (1 if self.lora is not None else 2) if enable_sleep_mode else 0
        self.stop_ids = stop_ids_of(model, tokenizer)
        self._seeds = random.Random(seed)
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 2048
        self.max_seq_len = min(limit, max_model_len or limit)
        self.version = 0
        self.sent = self.answered = 0  # requests written to the worker, replies read back
        self.replies: dict[int, dict] = {}
        self.dir = Path(tempfile.mkdtemp(prefix="posttrain-vllm-"))
        base = self.dir / "base"
        self._write_base(base)
        env = vllm_env()
        env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the worker's own function after a reload (_retie_lm_head)
        # vLLM forks its engine process on CUDA: forked, it would hold the worker's reply pipe open after the worker
        # died, and the trainer would wait on it forever; spawned, it holds nothing of the worker's
        env["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"
        if first.device.type == "cuda":  # this rank's GPU, not every rank's vLLM on the first one
            env["CUDA_VISIBLE_DEVICES"] = physical_gpu(first.device.index if first.device.index is not None
                                                       else torch.cuda.current_device())
        self.log_path = self.dir / "worker.log"
        # It ends when its stdin does (this process ended, however); its group, with vLLM's own processes, in close()
        self.proc = start_group([exe, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=open(self.log_path, "w"), text=True, env=env, cwd=self.dir)
        dtype = str(first.dtype).removeprefix("torch.")
        options = {"model": str(base), "dtype": dtype, "max_model_len": self.max_seq_len,
                   "max_num_seqs": max_num_seqs, "seed": seed or 0, "gpu_memory_utilization": gpu_memory_utilization,
                   "enable_sleep_mode": enable_sleep_mode}
        if self.lora is not None:
            options.update(enable_lora=True, max_lora_rank=vllm_lora_rank(self.lora.r))
        log.info("starting vLLM (%s) for %s", exe, "a LoRA actor" if self.lora else "the model")
        self.vllm_version = self._call("start", **options)["version"]
        if self.lora is not None:
            self.update_weights()  # the adapter as it starts
        self._sleep()  # until the first batch: the trainer may load more (a reference, a reward model) first

    # -- the weights ---------------------------------------------------------------------------------
    def _write_base(self, folder: Path) -> None:
        """The model without its adapter (the base a LoRA version is loaded onto), as an HF folder."""
        from safetensors.torch import save_file

        folder.mkdir()
        body = self.model.get_base_model() if self.lora is not None else self.model
        body.config.save_pretrained(folder)
        save_file(self._weights(body), str(folder / "model.safetensors"))

    def _weights(self, body) -> dict[str, torch.Tensor]:
        """Plain HF names (a LoRA layer's base weight under its own name, adapters left out), each tensor once
        (tied embeddings: vLLM ties them itself), on the CPU."""
        out, seen = {}, set()
        for name, tensor in body.state_dict().items():
            if "lora_" in name:
                continue
            name = name.replace(".base_layer.", ".")
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            out[name] = tensor.detach().to("cpu").contiguous()
        return out

    def update_weights(self) -> None:
        """The model trained: vLLM generates from its current weights from the next call on."""
        from safetensors.torch import save_file

        self._make_room()
        self.version += 1
        folder = self.dir / f"v{self.version}"
        folder.mkdir()
        if self.lora is not None:  # the adapter alone, as a new LoRA version
            self.model.save_pretrained(folder)
            self._call("adapter", name=f"actor-v{self.version}", id=self.version, path=str(folder))
        else:
            save_file(self._weights(self.model), str(folder / "model.safetensors"))
            self._call("reload", path=str(folder))
        previous = self.dir / f"v{self.version - 1}"
        shutil.rmtree(previous, ignore_errors=True)

    # -- generation ----------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Completion]:
        return self.collect(self.submit(prompts, params))

    def submit(self, prompts: list[list[int]], params: list[SamplingParams]) -> tuple:
        """The request goes to the worker now; vLLM generates while this process goes on (training)."""
        self._make_room()
        return self._send("generate", prompts=prompts, params=[self._vllm_params(p) for p in params]), prompts, params

    def collect(self, handle: tuple) -> list[Completion]:
        sent, prompts, params = handle
        done = self._reply(sent, "generate")["completions"]
        self._sleep()
        out = []
        for prompt, p, c in zip(prompts, params, done):
            ids = c["token_ids"]
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else self.stop_ids)
            stopped = c["finish_reason"] == "stop" and bool(ids) and ids[-1] in stops
            body = ids[:-1] if stopped else ids
            choices = [TokenChoice(t, lp, [tuple(x) for x in top] if p.logprobs else None)
                       for t, (lp, top) in zip(ids, c["logprobs"])] if p.logprobs is not None else []
            out.append(Completion(decode_continuation(self.tokenizer, prompt, body), ids,
                                  "stop" if stopped else "length", choices))
        return out

    def _vllm_params(self, p: SamplingParams) -> dict:
        if p.stop:
            raise ConfigError("the vllm backend gets token ids, not text: stop strings are not supported; use "
                              "stop_token_ids")
        seed = p.seed if p.seed is not None or p.greedy else self._seeds.getrandbits(63)
        stops = sorted(set(p.stop_token_ids) | (set() if p.ignore_eos else self.stop_ids))
        return {"max_tokens": min(p.max_new_tokens, self.max_seq_len), "temperature": p.temperature,
                "top_p": p.top_p, "top_k": p.top_k if p.top_k > 0 else -1,
                "repetition_penalty": p.repetition_penalty, "presence_penalty": p.presence_penalty,
                "frequency_penalty": p.frequency_penalty, "stop_token_ids": stops, "ignore_eos": True,
                "seed": seed, "logprobs": p.logprobs}

    # -- the worker ----------------------------------------------------------------------------------
    def _make_room(self) -> None:
        """Before vLLM wakes (the next update or batch): the memory training freed goes back to the GPU, where vLLM
        can take it; PyTorch would otherwise keep it cached for its own next step."""
        if self.sleep_level and torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _sleep(self) -> None:
        """With sleep mode, vLLM frees its GPU memory now (the worker wakes it when it is next needed)."""
        if self.sleep_level and self.sent == self.answered:  # nothing queued that would wake it at once
            self._call("sleep", level=self.sleep_level)

    def _call(self, op: str, **request) -> dict:
        return self._reply(self._send(op, **request), op)

    def _send(self, op: str, **request) -> int:
        """Queue a request with the worker; its number, for `_reply`. The worker answers in order."""
        if self.proc is None or self.proc.poll() is not None:
            raise PosttrainError(f"the vLLM worker is not running{self._why_it_ended()}")
        try:
            self.proc.stdin.write(json.dumps({"op": op, **request}) + "\n")
            self.proc.stdin.flush()
        except OSError:  # it ended since the check above
            raise PosttrainError(f"the vLLM worker ended before {op}{self._why_it_ended()}") from None
        self.sent += 1
        return self.sent

    def _reply(self, number: int, op: str) -> dict:
        while number not in self.replies:  # replies to earlier requests not yet collected are kept
            line = self.proc.stdout.readline()
            if not line:
                raise PosttrainError(f"the vLLM worker ended during {op}{self._why_it_ended()}")
            self.answered += 1
            self.replies[self.answered] = json.loads(line)
        reply = self.replies.pop(number)
        if not reply.pop("ok"):
            raise PosttrainError(f"vLLM {op} failed: {reply['error']}{self._log_tail()}")
        return reply

    def _why_it_ended(self) -> str:
        """How the worker ended, and its log's last lines unless a signal ended it (its log cannot say why)."""
        if self.proc is None:
            return ""
        try:
            code = self.proc.wait(timeout=10)  # its stdout closed or it is gone: it is ending
        except subprocess.TimeoutExpired:
            return f" (its output closed){self._log_tail()}"
        if code < 0:
            name = signal.Signals(-code).name
            return f" (killed by {name}{': out of memory, or killed by hand' if code == -signal.SIGKILL else ''})"
        return f" (exit {code}){self._log_tail()}"

    def _log_tail(self, lines: int = 15) -> str:
        try:
            # without what every weight update logs, so the lines before the end are the ones that say why
            tail = [line for line in self.log_path.read_text(errors="replace").splitlines()
                    if line.strip() and not any(x in line for x in ROUTINE_LOG)][-lines:]
        except OSError:
            return ""
        return ("; its log ends:\n" + "\n".join(tail)) if tail else ""

    def close(self) -> None:
        if getattr(self, "proc", None) is not None:
            try:
                if self.proc.poll() is None:
                    self.proc.stdin.write(json.dumps({"op": "close"}) + "\n")
                    self.proc.stdin.close()
                    self.proc.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
            end_group(self.proc, timeout=10)  # what is left: all of it if it hung, vLLM's processes if it died
            try:
                self.proc.stdin.close()  # a request it died before reading would be flushed at exit, noisily
            except OSError:
                pass
            self.proc = None
        if getattr(self, "dir", None) is not None:  # not there when the constructor refused the model
            shutil.rmtree(self.dir, ignore_errors=True)

    def __del__(self):
        self.close()
