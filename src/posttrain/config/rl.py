"""`posttrain ppo` / `posttrain grpo`: the RL config, its estimator-dependent defaults and its alarms."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import Field, TypeAdapter, ValidationError, model_validator

from posttrain.config.args import SCHEDULERS, DataArgs, DatasetEntry, QuantizationArgs, TrainArgs

ADVANTAGE_ESTIMATORS = ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")
GENERATION_BACKENDS = ("auto", "engine", "vllm", "hf")
LOSS_AGG_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
_BOOL = TypeAdapter(bool)  # a raw use_kl_loss as its field reads it (true, "yes", 1, ...)


# RL alarms (train/rl/alarms.py): when a logged step's metric drifts past its threshold.
ALARM_DEFAULTS = {
    "kl": 1.0,  # KL to the reference above this: the policy has wandered far (reward hacking, collapse)
    "entropy_drop": 0.2,  # entropy below this fraction of the first step's: sampling collapsing to one answer
    "length_ratio": 3.0,  # mean response length this many times above (or below 1/x) the first step's
    "clip_fraction": 0.3,  # share of tokens clipped above this: updates too large for the trust region
    "truncated": 0.5,  # share of completions cut at max_completion_length above this
    "logp_gap": 0.1,  # mean |trainer - rollout engine| log-prob of the sampled tokens (at temperature 1) above
    #   this: the sampler is not sampling the policy being trained (stale weights, precision mismatch)
    "retain_drop": 0.95,  # retain_eval_dataset's eval reward below this fraction of its value before training:
    #   the run is unlearning the skill it must keep
}


class RLConfig(TrainArgs, QuantizationArgs, DataArgs):
    """`posttrain ppo` / `posttrain grpo`: RL on prompts, one loop, the advantage estimator picks the algorithm.

    Each step: `rollout_batch_size` prompts x `num_generations` completions are sampled from the
    actor, scored by the rewards, and trained on for `ppo_epochs` passes in mini-batches of
    `per_device_train_batch_size` x `gradient_accumulation_steps` completions (one optimizer step
    each). `max_steps` counts these rollout steps.

    Defaults that depend on the estimator (None below) follow the setups each method was published
    with, and are resolved here, in one place:

      estimator              critic  KL goes           advantages whitened  loss aggregation
      gae (PPO)              yes     into the reward   yes                  token_mean
      grpo                   no      into the loss     no (group z-score)   token_mean
      dr_grpo                no      into the loss     no (group - mean)    seq_mean_token_sum_norm
      rloo                   no      into the reward   no (leave-one-out)   token_mean
      reinforce_pp           no      into the reward   yes (global batch)   token_mean
      reinforce_pp_baseline  no      into the reward   yes (global batch)   token_mean

    The KL estimator defaults to k1 in the reward and k3 in the loss (its gradient is unbiased
    there). `num_generations` defaults to 1 for gae and 4 for the group estimators.
    """

    DATASET_KEYS: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset", "retain_eval_dataset")

    stage: Literal["ppo", "grpo"] = Field("ppo", description="the command this file is for")
    learning_rate: float = Field(1e-6, gt=0)
    lr_scheduler_type: Literal[SCHEDULERS] = "constant"
    per_device_train_batch_size: int = Field(8, ge=1, description="completions per micro-batch in the update")
    logging_steps: int = Field(1, ge=1)  # rollout steps are long: log every one
    num_train_epochs: float = Field(1.0, gt=0, description="passes over the prompts (when max_steps is -1)")
    cutoff_len: int = Field(512, ge=2, description="longest prompt in tokens; a longer one keeps its last tokens")

    # rewards: any mix, summed with reward_weights (in this order: reward_model first, then reward_funcs)
    reward_model: str | None = Field(
        None, description="a folder written by `posttrain rm` (normalized with its saved mean/std), or by `posttrain "
                          "dpo` (its implicit reward, beta * log pi/pi_ref of the completion)")
    reward_funcs: list[str] = Field(
        default_factory=list, description="exact_match, numeric_match, format:REGEX, path/to/file.py:function, or "
                                          "an http(s):// endpoint")
    reward_weights: list[float] | None = Field(
        None, description="a weight per reward, reward_model first; null: 1 each")
    reward_timeout: float = Field(30.0, gt=0, description="seconds per call to a remote reward endpoint")
    reward_clip: float | None = Field(None, gt=0, description="clip the summed reward to [-c, c]; null: no clip")
    normalize_reward: bool = Field(False, description="scale rewards by a running mean/std over training")

    # rollouts
    advantage_estimator: Literal[ADVANTAGE_ESTIMATORS] | None = Field(
        None, description="gae | grpo | dr_grpo | rloo | reinforce_pp | reinforce_pp_baseline; null: gae for ppo, "
                          "grpo for grpo")
    rollout_batch_size: int = Field(8, ge=1, description="prompts per step, per process")
    num_generations: int | None = Field(
        None, ge=1, description="completions per prompt (the group); null: 1 for gae, 4 for the others")
    max_completion_length: int = Field(64, ge=1, description="longest completion in tokens")
    temperature: float = Field(1.0, gt=0, description="sampling temperature of the rollouts")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the rollouts; 1: off")
    top_k: int = Field(0, ge=0, description="top-k sampling of the rollouts; 0: off")
    rollout_backend: Literal[GENERATION_BACKENDS] = Field(
        "auto", description="what samples the rollouts: engine (built in) | vllm | hf (transformers generate) | "
                            "auto (vllm on CUDA when installed, else the engine)")
    vllm_python: str | None = Field(
        None, description="vllm: the Python of an environment with vLLM (`make vllm`); null: $POSTTRAIN_VLLM_PYTHON, "
                          "else this Python when it imports vllm")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0, le=1, description="vllm on a GPU: the share of its memory vLLM may take beside training")
    vllm_enable_sleep_mode: bool = Field(
        False, description="vllm on a GPU shared with training: vLLM frees its weights and KV cache while the actor "
                           "trains and takes them back to sample (a LoRA actor's base waits in host memory)")
    async_rollouts: int = Field(
        0, ge=0, description="sample the next N steps' rollouts before this step trains, on the weights as they are "
                             "(off-policy by N updates; with vllm generation overlaps training); 0: on-policy")
    tis_cap: float | None = Field(
        None, gt=0, description="truncated importance sampling: weight each token's policy loss by min(exp(trainer - "
                                "sampler log-prob), tis_cap), correcting for a rollout engine that samples a "
                                "slightly different policy (vLLM); null: off")

    # the update
    ppo_epochs: int = Field(1, ge=1, description="passes over each rollout")
    cliprange: float = Field(0.2, gt=0, description="epsilon of the clipped ratio")
    cliprange_high: float | None = Field(
        None, gt=0, description="asymmetric upper clip, DAPO; null: cliprange")
    dual_clip: float | None = Field(
        None, gt=1, description="dual-clip constant c for negative advantages (e.g. 3.0); null: off")
    entropy_coef: float = Field(0.0, ge=0, description="weight of an entropy bonus")
    loss_agg_mode: Literal[LOSS_AGG_MODES] | None = Field(
        None, description="token_mean | seq_mean_token_mean | seq_mean_token_sum_norm; null: by advantage_estimator")
    whiten_advantages: bool | None = Field(
        None, description="normalize advantages over the batch; null: by advantage_estimator")

    # KL to the reference (the starting model; with LoRA the base with the adapter disabled, but PiSSA's base is a
    # residual: a copy of the starting model then)
    kl_coef: float = Field(
        0.05, ge=0, description="weight of the KL to the reference; 0: no reference model at all")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="k1 | k2 | k3; null: k3 in the loss, k1 in the reward")
    use_kl_loss: bool | None = Field(
        None, description="KL as a loss term (true) or a per-token reward penalty (false); null: by "
                          "advantage_estimator")
    kl_target: float | None = Field(
        None, gt=0, description="adapt kl_coef toward this KL (Ziegler et al. 2019); null: a fixed kl_coef")
    kl_horizon: int = Field(10000, ge=1, description="kl_target: the adaptive coefficient's horizon, in completions")
    ref_model: str | None = Field(None, description="the reference model folder; null: model_name_or_path")

    # GAE and the critic (advantage_estimator: gae)
    gamma: float = Field(1.0, ge=0, le=1, description="gae: discount")
    lam: float = Field(0.95, ge=0, le=1, description="gae: lambda")
    critic_model: str | None = Field(
        None, description="gae: the critic's starting folder; null: reward_model if given (a `posttrain rm` one), "
                          "else model_name_or_path")
    critic_learning_rate: float = Field(9e-6, gt=0, description="gae: the critic's learning rate")
    cliprange_value: float = Field(0.2, gt=0, description="gae: clip of the value update")
    critic_warmup_steps: int = Field(0, ge=0, description="gae: rollout steps that train the critic only")

    # where the roles run (train/rl/placement.py)
    placement: Literal["none", "ray"] = Field(
        "none", description="ray: the rollout sampler, the reference and the reward model each in a Ray actor")
    ray_address: str | None = Field(
        None, description="ray: a cluster to join (auto: the one `ray start` runs here); null: start Ray locally")
    ray_num_cpus_per_role: float = Field(1.0, gt=0, description="ray: CPUs reserved for each role (fractions allowed)")
    ray_num_gpus_per_role: float = Field(0.0, ge=0, description="ray: GPUs for each role (fractions allowed); 0: CPU")
    ray_placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="ray: PACK keeps the roles on as few nodes as fit, SPREAD puts them on different nodes")
    ray_weight_sync: Literal["collective", "object_store"] = Field(
        "collective", description="ray: how the trained weights reach the sampler's actor: collective (a gloo "
                                  "process group of the two) | object_store (through Ray's shared memory)")
    ray_trainer_ranks: int = Field(
        0, ge=0, description="ray: train in this many Ray actors, the ranks of one process group (as torchrun "
                             "--nproc_per_node would run them), each holding every role unless ray_separate_roles; 0: "
                             "the trainer stays in this process and the sampler, reference and reward model get actors "
                             "of their own")
    ray_separate_roles: bool = Field(
        False, description="ray_trainer_ranks: the sampler, reference and reward model in Ray actors of their own "
                           "that every rank uses (OpenRLHF's layout), not a copy in each rank (veRL's hybrid one)")

    # what the run shows while it goes (`posttrain board`)
    log_completions: bool = Field(True, description="write a sample of each step's rollouts to rollouts.jsonl")
    log_completions_per_step: int = Field(
        8, ge=1, description="completions written per step (whole groups first)")
    # A metric drifting past one sets alarm/<name> in metrics.jsonl and logs a warning.
    alarms: dict[str, float] = Field(
        default_factory=dict, description="alarm thresholds over the defaults: kl, entropy_drop, length_ratio, "
                                          "clip_fraction, truncated, logp_gap, retain_drop")
    retain_eval_dataset: Union[str, list[Union[str, DatasetEntry]], None] = Field(
        None, description="prompts with answers of a skill the run must keep (e.g. what SFT taught), as dataset: "
                          "scored greedily every eval_steps beside eval_dataset, logged as eval_retain_*; the "
                          "retain_drop alarm watches its reward")
    retain_metric: str = Field(
        "reward", description="what the retain_drop alarm watches on retain_eval_dataset: reward (the weighted total) "
                              "or one reward source by name (exact_match, model for the reward model, a function's "
                              "name), e.g. exact_match with a reward_weights entry of 0 to watch the skill alone")
    stop_on_alarms: list[str] = Field(
        default_factory=lambda: ["retain_drop"],
        description="alarms that end the run when they fire: it stops after that step and saves the model as it is "
                    "then; []: alarms only warn")

    @model_validator(mode="before")
    @classmethod
    def _estimator_defaults(cls, data: Any) -> Any:
        """The defaults that depend on the estimator (the table above), filled into the input where a key is
        absent or null: the config, `posttrain config` and the saved posttrain_config.yaml show what runs."""
        if not isinstance(data, dict):
            return data
        stage = data.get("stage") or cls.model_fields["stage"].default
        est = data.get("advantage_estimator") or ("gae" if stage == "ppo" else "grpo")
        if est not in ADVANTAGE_ESTIMATORS:
            return data  # the field's own check refuses it
        defaults = {"advantage_estimator": est,
                    "num_generations": 1 if est == "gae" else 4,
                    "use_kl_loss": est in ("grpo", "dr_grpo"),
                    "whiten_advantages": est in ("gae", "reinforce_pp", "reinforce_pp_baseline"),
                    "loss_agg_mode": "seq_mean_token_sum_norm" if est == "dr_grpo" else "token_mean"}
        data = {**data, **{key: value for key, value in defaults.items() if data.get(key) is None}}
        if data.get("kl_estimator") is None:
            try:
                use_kl_loss = _BOOL.validate_python(data["use_kl_loss"])
            except ValidationError:
                return data  # the field's own check refuses it
            data["kl_estimator"] = "k3" if use_kl_loss else "k1"
        return data

    @model_validator(mode="after")
    def _check_rl(self):
        est = self.advantage_estimator
        if est in ("grpo", "dr_grpo", "rloo", "reinforce_pp_baseline") and self.num_generations < 2:
            raise ValueError(f"advantage_estimator {est!r} compares completions of the same prompt: "
                             f"num_generations must be >= 2 (got {self.num_generations})")
        if self.reward_weights is not None:
            n = len(self.reward_funcs) + (self.reward_model is not None)
            if len(self.reward_weights) != n:
                raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for {n} rewards "
                                 "(reward_model first, then each of reward_funcs)")
        if self.tis_cap is not None and self.temperature != 1.0:
            raise ValueError(f"tis_cap compares the sampler's log-probs with the trainer's, which agree only at "
                             f"temperature 1 (got {self.temperature}); unset tis_cap or sample at temperature 1")
        if self.vllm_enable_sleep_mode and self.rollout_backend not in ("vllm", "auto"):
            raise ValueError(f"vllm_enable_sleep_mode is for vLLM rollouts, not rollout_backend "
                             f"{self.rollout_backend!r}: set rollout_backend: vllm, or leave it off")
        if self.vllm_enable_sleep_mode and self.async_rollouts:
            raise ValueError("vllm_enable_sleep_mode frees vLLM's memory while the actor trains, and async_rollouts "
                             "samples while it trains: choose one")
        if self.retain_metric != "reward" and not self.retain_eval_dataset:
            raise ValueError(f"retain_metric ({self.retain_metric!r}) is what the retain_drop alarm watches on "
                             "retain_eval_dataset: set retain_eval_dataset too, or leave retain_metric unset")
        for key in ("alarms", "stop_on_alarms"):
            unknown = sorted(set(getattr(self, key)) - set(ALARM_DEFAULTS))
            if unknown:
                raise ValueError(f"{key}: unknown {', '.join(unknown)}; known: {', '.join(ALARM_DEFAULTS)}")
        if self.ray_trainer_ranks and self.placement != "ray":
            raise ValueError("ray_trainer_ranks places the trainer's ranks with Ray: set placement: ray too (or use "
                             "torchrun --nproc_per_node without Ray)")
        if self.ray_separate_roles and not self.ray_trainer_ranks:
            raise ValueError("ray_separate_roles places the roles beside the trainer's Ray ranks: set ray_trainer_ranks "
                             "too (without it the roles always have actors of their own)")
        if self.ray_trainer_ranks and self.ray_num_gpus_per_role not in (0, 1):
            raise ValueError(f"ray_trainer_ranks: each rank trains on one whole GPU (NCCL puts no two ranks on one, "
                             f"and a rank uses one), not ray_num_gpus_per_role {self.ray_num_gpus_per_role:g}; set "
                             "it to 1, or 0 for CPU ranks")
        if not self.reward_model and not self.reward_funcs:
            raise ValueError("no reward: set reward_model (a `posttrain rm` or `posttrain dpo` folder) and/or "
                             "reward_funcs (exact_match, numeric_match, format:REGEX, file.py:function, http://...)")
        return self


class PPOConfig(RLConfig):
    stage: Literal["ppo"] = Field("ppo", description="the command this file is for")


class GRPOConfig(RLConfig):
    stage: Literal["grpo"] = Field("grpo", description="the command this file is for")
