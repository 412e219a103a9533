"""Steps the training stages (sft, rm, dpo, kto, ppo/grpo) share: checks, the tokenizer, the model
with its finetuning type, the output folder, the Trainer and the save. Each stage's file calls them
in order, top to bottom.

Every check runs before a model loads (the data's in data/stage_samples.py); the output folder is
only cleared once the data has been read and tokenized without error.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

from posttrain.config import save_config
from posttrain.data.templates import carry_template
from posttrain.errors import ConfigError
from posttrain.model.adapters import (
    apply_finetuning, check_finetuning, remove_pissa_initial, save_pissa_initial, save_trained, trainable_summary)
from posttrain.model.loading import load_model, load_tokenizer, pick_device
from posttrain.output_folder import RUN_MARKER, check_output_folder, clear_own_entries
from posttrain.train import distributed as dist
from posttrain.train.loop import Trainer, TrainResult, seed_everything
from posttrain.train.memory_plan import check_run_memory
from posttrain.train.parallel import check_parallel, loads_low_memory, parse_fsdp
from posttrain.train.reporting import check_tracker

log = logging.getLogger(__name__)


def check_output_dir(config) -> None:
    """The output folder is new, empty or an earlier posttrain run's, and holds nothing the run reads."""
    inputs = [(key, getattr(config, key, None))
              for key in ("model_name_or_path", "adapter_name_or_path", "ref_model", "reward_model", "critic_model")]
    inputs += [(which, e.path) for which in config.DATASET_KEYS for e in config.dataset_entries(which)]
    check_output_folder(config.output_dir, key="output_dir", marker=RUN_MARKER,
                        overwrite=config.overwrite_output_dir, resume=bool(config.resume_from_checkpoint),
                        inputs=inputs)


def start_run(config) -> torch.device:
    """Device and process group, the seed, and the checks that need nothing loaded (the memory plan among them:
    the models' config.json is all it reads)."""
    device = pick_device(config.device)
    if device.type == "cpu":  # what DeepSpeed would pick (transformers imports it at save), without its warning
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init(device)
    # Before any model is built or adapted: new heads, LoRA A, soft prompts and PiSSA's randomized SVD all draw
    # from torch's RNG, so the same config gives the same weights, and a resumed run the same frozen PiSSA base.
    seed_everything(config.seed)
    check_tracker(config.report_to)
    check_output_dir(config)
    if config.fp16 and device.type == "cpu":
        raise ConfigError("fp16 autocast is for CUDA; on CPU use bf16: true or neither")
    check_finetuning(config, device, packing=bool(getattr(config, "packing", False)))
    check_parallel(config)
    fsdp = parse_fsdp(getattr(config, "fsdp", None), getattr(config, "fsdp_config", None))
    if fsdp and fsdp.activation_checkpointing:  # FSDP's name for it: the model loads with checkpointing on
        config.gradient_checkpointing = True
    check_run_memory(config, device)  # the plan in the log's first lines; a run that cannot fit stops here
    return device


def load_low_memory(config, load: Callable[[bool], nn.Module], whole_because: str | None = None) -> nn.Module:
    """`load(on_meta)` on every rank. Under FSDP2 over several processes (train/parallel.py `loads_low_memory`)
    only rank 0 reads the weights and the other ranks build the model on the meta device, unless `whole_because`
    says why this stage loads it whole on every rank; a model whose meta-built layout (names, shapes, dtypes) is
    not the one rank 0 loaded (a model that reshapes itself on load) loads whole too. One log line says which."""
    if not loads_low_memory(config):
        return load(False)
    if whole_because:
        if dist.is_main():
            log.info("fsdp: the model loads whole on every rank (%s)", whole_because)
        return load(False)
    model = load(not dist.is_main())
    layout = lambda m: {k: (tuple(t.shape), str(t.dtype)) for k, t in [*m.state_dict().items(),  # noqa: E731
                                                                       *m.named_buffers()]}
    differs = dist.broadcast_object(layout(model) if dist.is_main() else None) != layout(model)
    if dist.all_reduce_sum(torch.tensor([float(differs)])).item() == 0:
        if dist.is_main():
            log.info("fsdp: low-memory load: rank 0 reads the weights; the other %d ranks build the model on the meta "
                     "device and receive their shards from rank 0 once it is sharded", dist.world_size() - 1)
        return model
    if dist.is_main():
        log.info("fsdp: the model built on the meta device does not match the one loaded; it loads whole on every rank")
        return model
    return load(False)


def load_trainable_model(config, device: torch.device, name_or_path: str | None = None,
                         whole_because: str | None = None):
    """The causal LM a stage trains, loaded with the config's model settings (attention, checkpointing,
    quantization for QLoRA), before `apply_finetuning_type`; under FSDP2 over several processes only rank 0 reads
    its weights (`load_low_memory`); `whole_because`: why this stage loads it whole on every rank instead."""
    return load_low_memory(config, lambda on_meta: load_model(
        name_or_path or config.model_name_or_path, device=device, trust_remote_code=config.trust_remote_code,
        attn_implementation=config.attn_implementation, gradient_checkpointing=config.gradient_checkpointing,
        quantization_bit=config.quantization_bit, on_meta=on_meta), whole_because)


def apply_finetuning_type(config, model, task_type: str = "CAUSAL_LM"):
    """`finetuning_type` applied to the loaded model (model/adapters.py), with its parameter counts."""
    model = apply_finetuning(model, config, task_type=task_type)
    summary = trainable_summary(model)
    if dist.is_main():
        log.info("finetuning_type %s: %s trainable parameters of %s (%.4f%%)", config.finetuning_type,
                 f"{summary['trainable_params']:,}", f"{summary['total_params']:,}", summary["trainable_percent"])
    return model, summary


def save_model(model, tokenizer, config, folder: Path, pissa_initial: Path | None = None,
               state_dict: dict | None = None) -> None:
    """The trained model (or PEFT adapter), tokenizer (with the chat template trained with) and resolved config
    into `folder`; `state_dict`: the model's weights gathered whole from a sharded run."""
    save_trained(model, folder, config, pissa_initial, state_dict=state_dict)
    carry_template(tokenizer, config.template)
    tokenizer.save_pretrained(folder)
    save_config(config, folder / "posttrain_config.yaml")


def load_stage_tokenizer(config):
    """The tokenizer a stage renders with: a starting adapter's own when it ships one (an earlier stage saved it
    there, with the chat template it trained with), else the model's."""
    adapter = getattr(config, "adapter_name_or_path", None)
    ships_own = adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file()
    return load_tokenizer(adapter if ships_own else config.model_name_or_path, config.trust_remote_code)


def open_output_dir(config) -> Path:
    """Clear an earlier run's entries (when asked) and create the output folder, with the resolved config in it."""
    out = Path(config.output_dir)
    if dist.is_main():
        if config.overwrite_output_dir and not config.resume_from_checkpoint:
            clear_own_entries(out)
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "posttrain_config.yaml")
    dist.barrier()
    return out


@contextlib.contextmanager
def pissa_initial_kept(config, model) -> Iterator[Path | None]:
    """A PiSSA adapter's initial state kept in the opened output folder while the run lasts, for the final
    save to convert the adapter into a plain LoRA of the original base (None for any other model);
    removed when the run ends, also on an error."""
    pissa_initial = save_pissa_initial(model, config.output_dir) if dist.is_main() else None
    dist.barrier()
    try:
        yield pissa_initial
    finally:
        remove_pissa_initial(pissa_initial)


def train_and_save(config, model, tokenizer, objective: nn.Module, train: list, evals: list, *,
                   collate: Callable[[list], dict], count: Callable[[dict], int], device: torch.device,
                   summary: dict) -> TrainResult:
    """The tail every causal-LM stage shares (sft, dpo, kto): the output folder (cleared only now,
    after every check), PiSSA's initial adapter kept for the save, the Trainer, and the model,
    tokenizer and config saved into the folder when training ends."""
    open_output_dir(config)
    with pissa_initial_kept(config, model) as pissa_initial:

        def save_final(folder: Path, state_dict: dict | None = None) -> None:
            save_model(model, tokenizer, config, folder, pissa_initial, state_dict)

        trainer = Trainer(config, objective, train_examples=train, eval_examples=evals, collate=collate, count=count,
                          save_final=save_final, device=device, run_config=config.model_dump(mode="json"),
                          summary=summary, saved_model=model)
        return trainer.train()
