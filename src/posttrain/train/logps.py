"""Sequence log-probabilities, and the reference model's, computed once and cached on disk.

`sequence_logps` gives, for every row of a batch, the summed log-probability of its trained tokens
(the response) and how many there are. The output head runs on those positions only, as in SFT.

The DPO family and KTO compare the policy with a frozen reference. The reference's log-probs never
change, so they are computed ONCE before training — batched, without gradients — and stored with
the samples; no reference model stays in memory while training. With no `ref_model` the reference
is the starting model itself (for a LoRA model: the base with the adapter disabled). The result is
cached on disk under a key made of the reference model's files, the precision, and every token and
trained position of the data (so the data, chat template and cutoff_len are all in it): a rerun
with another beta or loss skips the pass.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from posttrain.data.batching import collate
from posttrain.data.cache import cache_root
from posttrain.data.chat import IGNORE_INDEX, TokenizedSample
from posttrain.data.pairs import fingerprint
from posttrain.model.loading import load_model
from posttrain.model.parts import selected_logits
from posttrain.train import distributed as dist
from posttrain.train.loop import autocast

log = logging.getLogger(__name__)


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log p over each row's trained tokens, number of those tokens), both [rows]."""
    targets = batch["targets"]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    selected = targets != IGNORE_INDEX
    logits = selected_logits(model, inputs, selected)
    token_logps = -F.cross_entropy(logits.float(), targets[selected], reduction="none")
    rows = selected.nonzero()[:, 0]
    sums = torch.zeros(targets.size(0), dtype=token_logps.dtype, device=targets.device).index_add(0, rows, token_logps)
    return sums, selected.sum(dim=1)


@torch.no_grad()
def compute_logps(model: nn.Module, sequences: list[TokenizedSample], *, pad_id: int, device: torch.device,
                  batch_size: int, precision=contextlib.nullcontext, disable_adapter: bool = True) -> torch.Tensor:
    """Summed response log-probs of each sequence under `model`, in eval mode, sorted into batches by length
    (a PEFT model with its adapter disabled unless `disable_adapter` is False)."""
    was_training = model.training
    model.eval()
    out = torch.zeros(len(sequences), dtype=torch.float32)
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i].input_ids))
    peft = disable_adapter and hasattr(model, "disable_adapter")
    disable = model.disable_adapter() if peft else contextlib.nullcontext()
    with disable:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = {k: v.to(device) for k, v in collate([sequences[i] for i in idx], pad_id).items()}
            with precision():
                logps, _ = sequence_logps(model, batch)
            out[idx] = logps.float().cpu()
    model.train(was_training)
    return out


def default_cache_dir() -> Path:
    return cache_root() / "reference_logps"


def model_key(path: str | Path) -> dict:
    """What identifies a model's weights without reading them all: its config and each weight file's
    name, size and modification time (a retrained or replaced folder gets a new key)."""
    path = Path(path)
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin", ".pt", ".pth") or f.name.endswith(".json") and "config" in f.name:
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    config = (path / "config.json").read_text() if (path / "config.json").is_file() else ""
    return {"path": str(path.resolve()), "files": files, "config": hashlib.sha256(config.encode()).hexdigest()}


def reference_logps(samples: list, compute, *, model: dict, precision: str, cache_dir: str | Path | None,
                    what: str) -> None:
    """Fill `ref_*` on every sample (pairs: ref_chosen / ref_rejected; unpaired: ref / ref_mismatched).

    `compute(sequences) -> tensor` runs the reference; it is only called when the cache misses.
    """
    if not samples:
        return
    key = hashlib.sha256(json.dumps({"model": model, "precision": precision, "data": fingerprint(samples)},
                                    sort_keys=True).encode()).hexdigest()[:32]
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path = path / f"{key}.safetensors"
    sequences = [seq for s in samples for seq in s.sequences]

    def read():
        values = load_file(path)["logps"] if path.is_file() else None
        return values if values is not None and values.numel() == len(sequences) else None

    # The first process decides and computes; the others wait for its file (one answer for all ranks).
    cached = dist.broadcast_object(read() is not None if dist.is_main() else None)
    if cached:
        if dist.is_main():
            log.info("reference log-probs for %s: cached (%s)", what, path)
    else:
        if dist.is_main():
            log.info("reference log-probs for %s: computing %d sequences once, before training", what, len(sequences))
            values = compute(sequences)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            save_file({"logps": values.contiguous()}, str(tmp))
            os.replace(tmp, path)  # a killed run leaves no half-written cache entry
        dist.barrier()
    values = read()
    values = values.view(len(samples), -1).tolist()
    for s, (a, b) in zip(samples, values):
        s.set_reference(a, b)


def fill_reference(config, model: nn.Module, train: list, evals: list, pad_id: int, device: torch.device) -> None:
    """Reference log-probs for every sample: from `ref_model` if set (loaded, used, freed), else from
    `model` as it is now, before any training step. For a PEFT model that is the base with the
    adapter disabled — except under PiSSA, whose base is a residual: there the untrained adapter
    model itself (equal to the original base) is the reference."""
    ref_path = config.ref_model or config.model_name_or_path
    init = getattr(getattr(model, "active_peft_config", None), "init_lora_weights", None)
    pissa = isinstance(init, str) and init.startswith("pissa")
    holder: dict = {}

    def compute(sequences):
        if config.ref_model and "model" not in holder:
            holder["model"] = load_model(config.ref_model, device=device, trust_remote_code=config.trust_remote_code,
                                         attn_implementation=config.attn_implementation)
        ref = holder.get("model", model)
        return compute_logps(ref, sequences, pad_id=pad_id, device=device,
                             batch_size=config.per_device_eval_batch_size,
                             precision=lambda: autocast(device, config), disable_adapter=not pissa)

    precision = "bf16" if config.bf16 else "fp16" if config.fp16 else "fp32"
    for samples, what in ((train, "training data"), (evals, "eval data")):
        key = {**model_key(ref_path), "pissa": pissa, "quantization_bit": config.quantization_bit}
        reference_logps(samples, compute, model=key, precision=precision,
                        cache_dir=config.ref_cache_dir, what=what)
    holder.clear()  # the reference model, if one was loaded, is not kept for training
