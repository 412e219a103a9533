"""`posttrain ppo` / `posttrain grpo`: read top to bottom.

checks -> (placement: ray: the Ray roles' placement group; with ray_trainer_ranks, this whole recipe in each
rank's Ray actor, trainer_ranks.py) -> rewards (function files, built-ins,
endpoint, reward model) -> prompts -> actor (full,
freeze or LoRA) -> reference (frozen; a LoRA actor's own base with the adapter disabled, no copy; a
copy under PiSSA, whose base is a residual)
-> critic (gae only: a value head on the reward model or the actor's checkpoint) -> RLTrainer ->
the actor saved like any other stage's model (HF folder or PEFT adapter).
"""

from __future__ import annotations

import logging
from pathlib import Path

from posttrain.config import RLConfig
from posttrain.data.chat import ChatRenderer
from posttrain.data.formats import dataset_specs
from posttrain.data.prompts import Prompt, load_prompts
from posttrain.data.schema import Conversation
from posttrain.data.stage_samples import load_rows
from posttrain.data.templates import check_template_encodes
from posttrain.errors import ConfigError
from posttrain.model.loading import load_model
from posttrain.model.reward import check_is_reward_model, load_reward_model
from posttrain.train import distributed as dist, stage_steps
from posttrain.train.loop import TrainResult
from posttrain.train.rl.placement import RayReference, RaySession, check_placement, roles_apart
from posttrain.train.rl.rewards import build_rewards, critic_source
from posttrain.train.rl.trainer import RLTrainer

log = logging.getLogger(__name__)

RL_FINETUNING = ("full", "freeze", "lora")


def check_rl(config: RLConfig) -> None:
    if config.finetuning_type not in RL_FINETUNING:
        raise ConfigError(f"finetuning_type {config.finetuning_type!r} is not available for RL; use one of "
                          f"{', '.join(RL_FINETUNING)}")
    check_placement(config)
    if config.reward_model:  # here, before Ray starts: a causal-LM folder would score with a random head (noise)
        check_is_reward_model(config.reward_model, "reward_model")
    if config.rollout_backend == "vllm" or config.vllm_enable_sleep_mode:  # where vLLM is, before any model loads
        from posttrain.generation.vllm_backend import check_vllm_config

        check_vllm_config(config)


def tokenize_prompts(prompts: list[Prompt], tokenizer, template: str | None, cutoff_len: int
                     ) -> list[tuple[list[int], Prompt]]:
    """Each prompt rendered with the chat template and its generation prompt; longer than cutoff_len
    keeps its last tokens (the question and the assistant header are at the end)."""
    renderer = ChatRenderer(tokenizer, template)
    check_template_encodes(tokenizer, renderer.template, template)
    return [(renderer.generation_prompt_ids(Conversation(messages=p.messages, tools=p.tools, source=p.source))
             [-cutoff_len:], p) for p in prompts]


def run_rl(config: RLConfig) -> TrainResult:
    check_rl(config)
    if config.placement == "ray" and config.ray_trainer_ranks:  # each rank runs train_here in a Ray actor
        from posttrain.train.rl.trainer_ranks import run_trainer_ranks

        return run_trainer_ranks(config)
    return train_here(config)


def train_here(config: RLConfig, placed: RaySession | None = None) -> TrainResult:
    """The run in this process: alone, as one torchrun rank or Ray trainer rank, or beside the Ray roles.
    `placed`: the roles' session of a Ray trainer rank that shares them with the other ranks."""
    device = stage_steps.start_run(config)
    if placed is None and roles_apart(config):  # beside this process, the trainer
        placed = RaySession(config)
    try:
        return _run_rl(config, device, placed)
    finally:
        if placed is not None:
            placed.close()


def _run_rl(config: RLConfig, device, placed: RaySession | None) -> TrainResult:
    rewards = build_rewards(config, device, placed)  # function files and endpoints fail here, before anything big
    tokenizer = stage_steps.load_stage_tokenizer(config)
    rows, eval_rows = load_rows(config, load_prompts)
    retain_rows = load_prompts(dataset_specs(config, "retain_eval_dataset"), config.on_bad_rows,
                               config.seed)[0] if config.retain_eval_dataset else []
    rewards.check(rows + eval_rows + retain_rows)
    prompts, evals, retain = (tokenize_prompts(r, tokenizer, config.template, config.cutoff_len)
                              for r in (rows, eval_rows, retain_rows))
    if dist.is_main():
        log.info("%s (%s): %d prompts x %d completions per step, %d held-out prompts%s; rewards: %s",
                 config.stage, config.advantage_estimator, config.rollout_batch_size, config.num_generations,
                 len(evals), f", {len(retain)} to retain" if retain else "", ", ".join(rewards.names))

    # Sharded, the rollout copy of the actor is a whole model on every rank anyway (rl/trainer.py).
    actor = stage_steps.load_trainable_model(config, device, whole_because="RL keeps a whole rollout copy of the "
                                             "actor on each rank; low-memory loading serves sft, dpo, kto and rm")
    limit = getattr(actor.config, "max_position_embeddings", None)
    longest = max(len(p) for p, _ in prompts + evals + retain) + config.max_completion_length
    if limit and longest > limit:
        raise ConfigError(f"the longest prompt ({longest - config.max_completion_length} tokens) plus "
                          f"max_completion_length ({config.max_completion_length}) exceeds the model's "
                          f"{limit} positions; lower cutoff_len or max_completion_length")
    actor, summary = stage_steps.apply_finetuning_type(config, actor)
    reference = None
    if config.kl_coef > 0 or config.kl_target:
        # The base under a LoRA adapter IS the starting model: no copy. Not under PiSSA, whose base is a residual.
        if config.finetuning_type == "lora" and not config.ref_model and not config.pissa_init:
            reference = "adapter-disabled"
        elif placed is not None:
            reference = RayReference(placed, config.ref_model or config.model_name_or_path, config,
                                     tokenizer.pad_token_id, max(config.per_device_eval_batch_size,
                                                                 config.per_device_train_batch_size))
        else:
            reference = load_model(config.ref_model or config.model_name_or_path, device=device,
                                   trust_remote_code=config.trust_remote_code,
                                   attn_implementation=config.attn_implementation)
            reference.requires_grad_(False).eval()
    critic = None
    if config.advantage_estimator == "gae":
        critic_path = critic_source(config)
        critic = load_reward_model(critic_path, device=device, trust_remote_code=config.trust_remote_code,
                                   attn_implementation=config.attn_implementation,
                                   gradient_checkpointing=config.gradient_checkpointing,
                                   pad_token_id=tokenizer.pad_token_id)
        if dist.is_main():
            log.info("critic: a value head on %s", critic_path)
    stage_steps.open_output_dir(config)
    with stage_steps.pissa_initial_kept(config, actor) as pissa_initial:

        def save_final(folder: Path, state_dict: dict | None = None) -> None:
            stage_steps.save_model(actor, tokenizer, config, folder, pissa_initial, state_dict=state_dict)

        trainer = RLTrainer(config, actor=actor, critic=critic, reference=reference, rewards=rewards,
                            tokenizer=tokenizer, prompts=prompts, eval_prompts=evals, retain_prompts=retain, device=device,
                            save_final=save_final, summary=summary, placed=placed)
        out = trainer.train()
    return TrainResult(out["steps"], None, None, out["output_dir"], out["plot"], out["metrics"], actor)
