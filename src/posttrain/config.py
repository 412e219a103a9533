"""One typed config per command, read from YAML plus `key=value` overrides (and `--flags` for the
commands that had them: serve, score, chat, compare).

Key names follow LLaMA-Factory / Hugging Face TrainingArguments (and `vllm serve` for serve), so a user's
existing YAML mostly works as it is. Unknown keys and invalid values are refused with the key's name and
what is allowed. `posttrain config COMMAND` prints every key with its default and description.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, ClassVar, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

from posttrain.errors import ConfigError

SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup", "polynomial",
              "inverse_sqrt")
FORMATTINGS = ("auto", "prompt_completion", "alpaca", "role", "openai", "sharegpt", "text", "preference")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "bco_pair")

FINETUNING_TYPES = ("full", "freeze", "lora", "qlora", "ptuning", "prompt_tuning", "prefix_tuning")

# The one alias table: other names users bring from TRL / LLaMA-Factory for the same key, per command.
# Each alias maps straight to the key it means in that command (TRL's `beta` is DPO's pref_beta but
# GRPO's kl_coef), never through another alias.
_COMMON_ALIASES = {"max_length": "cutoff_len", "max_seq_length": "cutoff_len", "lr": "learning_rate",
                   "dataset_path": "dataset", "additional_target": "modules_to_save", "lora_r": "lora_rank"}
_PREFERENCE_ALIASES = {"beta": "pref_beta", "rpo_alpha": "pref_ftx"}
_RL_ALIASES = {"beta": "kl_coef", "max_new_tokens": "max_completion_length", "num_ppo_epochs": "ppo_epochs",
               "epsilon": "cliprange", "epsilon_high": "cliprange_high", "lambd": "lam"}
_MODEL_ALIASES = {"model_name_or_path": "model"}
ALIASES = {
    "sft": _COMMON_ALIASES, "rm": _COMMON_ALIASES,
    "dpo": {**_COMMON_ALIASES, **_PREFERENCE_ALIASES, "loss_type": "pref_loss",
            "label_smoothing": "dpo_label_smoothing"},
    "kto": {**_COMMON_ALIASES, **_PREFERENCE_ALIASES, "desirable_weight": "kto_chosen_weight",
            "undesirable_weight": "kto_rejected_weight"},
    "ppo": {**_COMMON_ALIASES, **_RL_ALIASES}, "grpo": {**_COMMON_ALIASES, **_RL_ALIASES},
    "export": {},
    # serve: the names `vllm serve` gives these keys, and the singular its own repeatable flags use
    "serve": {**_MODEL_ALIASES, "chat_template": "template", "lora_modules": "adapters", "adapter": "adapters",
              "adapter_dir": "adapter_dirs", "api_keys": "api_key", "max_num_seqs": "max_batch_size"},
    "score": {**_MODEL_ALIASES, "dataset": "data", "max_length": "cutoff_len"},
    "chat": {**_MODEL_ALIASES, "adapter_name_or_path": "adapter"},
    "compare": {"model_name_or_path": "base", "dataset": "data", "max_steps": "steps",
                "per_device_train_batch_size": "batch_size"},
}


class _Strict(BaseModel):
    # allow_inf_nan: `learning_rate: .inf` or `nan` passes `gt=0` and trains a model of NaNs.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DatasetEntry(_Strict):
    """One data source; `dataset:` takes a path, a list of paths, or a list of these."""

    path: str
    weight: float = Field(1.0, gt=0)
    formatting: Literal[FORMATTINGS] = "auto"
    columns: dict[str, str] | None = None


_LORA = ("lora", "qlora")


class FinetuningArgs(_Strict):
    """Which parameters train: all, some layers, or a LoRA-family adapter (every training stage).

    Names follow LLaMA-Factory (finetuning_type, lora_rank, lora_target, freeze_trainable_layers,
    ...) and PEFT (modules_to_save, use_dora, ...).
    """

    finetuning_type: Literal[FINETUNING_TYPES] = Field(
        "full", description="full | freeze | lora | qlora | ptuning | prompt_tuning | prefix_tuning")
    adapter_name_or_path: str | None = Field(None, description="start from this PEFT adapter folder and train it on")

    # freeze: train the last N decoder layers (negative: the first N), optionally only some modules in them
    freeze_trainable_layers: int = Field(
        2, description="freeze: train the last N decoder layers (negative: the first N)")
    freeze_trainable_modules: Union[str, list[str]] = Field(
        "all", description='freeze: in those layers, "all" or these modules, e.g. [mlp] or "mlp,self_attn"')
    freeze_extra_modules: Union[str, list[str], None] = Field(
        None, description="freeze: also train these modules, e.g. [embed_tokens, norm]")

    # lora / qlora
    lora_rank: int = Field(8, gt=0, description="LoRA rank r")
    lora_alpha: float | None = Field(None, gt=0, description="LoRA scaling alpha; null: 2 * lora_rank")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target: Union[str, list[str]] = Field(
        "all", description='modules that get LoRA: "all" (every linear layer but the output head) or e.g. '
                           "[q_proj, v_proj]")
    modules_to_save: Union[str, list[str], None] = Field(
        None, description="also trained in full and saved with the adapter, e.g. [embed_tokens, lm_head]")
    use_dora: bool = Field(False, description="weight-decomposed LoRA (DoRA)")
    use_rslora: bool = Field(False, description="rank-stabilised scaling: alpha / sqrt(r) instead of alpha / r")
    pissa_init: bool = Field(False, description="initialise A/B from the principal singular vectors (PiSSA); "
                                                "saved as plain LoRA for the original base")
    pissa_iter: int = Field(16, description="fast-SVD iterations for PiSSA; -1: exact SVD")
    loraplus_lr_ratio: float | None = Field(
        None, gt=0, description="LoRA+: B matrices learn this many times faster (e.g. 16); null: off")

    @model_validator(mode="after")
    def _check_finetuning(self):
        self._check_keys_match_type()
        if self.use_dora and self.pissa_init:
            raise ValueError("use_dora and pissa_init cannot be combined; choose one")
        return self

    def _check_keys_match_type(self) -> None:
        """A key of another finetuning type, set to something other than its default, would be ignored:
        `lora_rank: 16` with `finetuning_type: full` trains every parameter. Refused instead."""
        for key, types in KEYS_OF_TYPES.items():
            if key in self.model_fields_set and self.finetuning_type not in types:
                value = getattr(self, key)
                if value != type(self).model_fields[key].default:
                    raise ValueError(f"{key} is set ({value!r}) but finetuning_type is {self.finetuning_type!r}, "
                                     f"which ignores it; it takes effect with finetuning_type {' or '.join(types)}. "
                                     "Set finetuning_type, or remove the key")


class QuantizationArgs(_Strict):
    """QLoRA: LoRA over a base quantized by bitsandbytes (CUDA only); sft, dpo, kto, ppo / grpo.

    Mixed in beside FinetuningArgs, whose finetuning_type it reads; rm has no quantized base (its
    LoRA is merged into the saved reward model).
    """

    quantization_bit: Literal[4, 8, None] = Field(
        None, description="4 | 8: the base loaded in that many bits, LoRA trained over it; finetuning_type qlora "
                          "implies 4; null: not quantized")

    @model_validator(mode="before")
    @classmethod
    def _qlora_is_4_bit(cls, data: Any) -> Any:
        # Filled into the input, so the resolved config (and the saved posttrain_config.yaml) shows the 4.
        if isinstance(data, dict) and data.get("finetuning_type") == "qlora" and data.get("quantization_bit") is None:
            return {**data, "quantization_bit": 4}
        return data

    @model_validator(mode="after")
    def _check_quantization(self):
        if self.quantization_bit is not None and self.finetuning_type not in _LORA:
            raise ValueError(f"quantization_bit is for lora/qlora, not finetuning_type {self.finetuning_type!r}")
        return self


class PromptLearningArgs(_Strict):
    """Trained virtual tokens in front of the input: ptuning / prompt_tuning / prefix_tuning (sft, dpo, kto).

    Names follow PEFT (num_virtual_tokens, encoder_hidden_size, prefix_projection, ...). Mixed in
    beside FinetuningArgs: its key check refuses these keys under another finetuning_type.
    """

    num_virtual_tokens: int = Field(20, gt=0, description="ptuning / prompt_tuning / prefix_tuning: the virtual "
                                                          "tokens")
    encoder_hidden_size: int | None = Field(
        None, gt=0, description="ptuning / prefix_tuning: the prompt encoder's (or prefix MLP's) width; null: the "
                                "model's hidden size")
    encoder_reparameterization_type: Literal["MLP", "LSTM"] = Field(
        "MLP", description="ptuning: the prompt encoder, MLP | LSTM")
    prompt_tuning_init_text: str | None = Field(
        None, description="prompt_tuning: initialise the soft prompt from this text; null: at random")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparameterise the prefixes through an MLP")


# The finetuning types each type-specific key takes effect with; a class checks the ones it has.
KEYS_OF_TYPES = {
    **dict.fromkeys(("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "modules_to_save", "use_dora",
                     "use_rslora", "pissa_init", "pissa_iter", "loraplus_lr_ratio"), _LORA),
    **dict.fromkeys(("freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules"), ("freeze",)),
    "num_virtual_tokens": ("ptuning", "prompt_tuning", "prefix_tuning"),
    "encoder_hidden_size": ("ptuning", "prefix_tuning"),
    "encoder_reparameterization_type": ("ptuning",),
    "prompt_tuning_init_text": ("prompt_tuning",),
    "prefix_projection": ("prefix_tuning",),
}


class TrainArgs(FinetuningArgs):
    """Keys every training stage shares (the loop's settings)."""

    model_name_or_path: str = Field(description="the model to start from: a local HF folder (nothing is downloaded)")
    output_dir: str = Field(description="where the trained model, its config, metrics and checkpoints go")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")
    overwrite_output_dir: bool = Field(False, description="replace an output_dir that holds an earlier run")

    learning_rate: float = Field(2e-5, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, ge=0, description="clip the gradient norm to this; 0: no clipping")
    per_device_train_batch_size: int = Field(4, ge=1, description="rows per micro-batch, per process")
    per_device_eval_batch_size: int = Field(8, ge=1, description="rows per evaluation batch, per process")
    gradient_accumulation_steps: int = Field(1, ge=1, description="micro-batches per optimizer step")
    num_train_epochs: float = Field(3.0, gt=0, description="passes over the training data (when max_steps is -1)")
    max_steps: int = Field(-1, description="optimizer steps; > 0 overrides num_train_epochs, -1: not set")
    lr_scheduler_type: Literal[SCHEDULERS] = Field(
        "cosine", description="linear | cosine | cosine_with_min_lr | constant | constant_with_warmup | polynomial "
                              "| inverse_sqrt")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the steps that warm the learning rate up")
    warmup_steps: int = Field(0, ge=0, description="warm-up steps; > 0 overrides warmup_ratio")

    logging_steps: int = Field(10, ge=1, description="log metrics every this many steps")
    eval_steps: int | None = Field(
        None, ge=1, description="evaluate every this many steps, and at the end; null: logging_steps * 10")
    save_steps: int = Field(500, ge=0, description="checkpoint every this many steps; 0: only the final model")
    save_total_limit: int | None = Field(2, ge=1, description="checkpoints kept (the oldest go); null: all")
    resume_from_checkpoint: str | None = Field(
        None, description="auto (the newest checkpoint in output_dir) or a checkpoint folder; null: start afresh")
    report_to: Literal["none", "tensorboard", "wandb"] = Field(
        "none", description="none | tensorboard | wandb (metrics.jsonl is always written)")
    plot_loss: bool = Field(True, description="write the loss curve as a PNG in output_dir")
    disable_tqdm: bool = Field(False, description="no progress bar")

    seed: int = Field(42, description="seed for initialisation, data order and sampling")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (auto: cuda if present)")
    bf16: bool = Field(False, description="bfloat16 autocast")
    fp16: bool = Field(False, description="float16 autocast with loss scaling")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass: less "
                                                            "memory, more time")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="sdpa | eager | flash_attention_2 (CUDA)")
    # Several processes (torchrun): how the model is split over them (train/parallel.py). As in HF TrainingArguments.
    fsdp: str | None = Field(
        None, description="torchrun: FSDP2, full_shard | shard_grad_op | hybrid_shard | no_shard, optionally "
                          "followed by ' offload'; null: each rank holds everything (DDP)")
    fsdp_config: dict[str, Any] | None = Field(
        None, description="fsdp's settings: cpu_offload, reshard_after_forward, activation_checkpointing, ...")
    deepspeed: str | None = Field(
        None, description="torchrun: a DeepSpeed JSON config (ZeRO stage 0-3, offload), its \"auto\" values filled "
                          "from these keys; null: not DeepSpeed")
    memory_budget_gb: float | None = Field(
        None, gt=0, description="per-rank memory budget in GiB: the run's memory plan (`posttrain plan`) must fit it "
                                "or the run is refused before anything loads; null: the memory available on the "
                                "device (CPU: the available RAM, shared by the node's processes)")

    @model_validator(mode="after")
    def _check_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16 are both set; choose one")
        if self.max_steps == 0 or self.max_steps < -1:
            raise ValueError(f"max_steps must be a positive number of optimizer steps, or -1 to train "
                             f"num_train_epochs (got {self.max_steps})")
        return self


class DataArgs(_Strict):
    """Keys for reading and rendering data, every training stage."""

    DATASET_KEYS: ClassVar[tuple[str, ...]] = ("dataset", "eval_dataset")  # the keys that name data files

    dataset: Union[str, list[Union[str, DatasetEntry]]] = Field(
        description="jsonl/json/parquet/csv, a folder, a save_to_disk dataset, or a list: "
                    "[{path: a.jsonl, weight: 2.0}, b.parquet]")
    eval_dataset: Union[str, list[Union[str, DatasetEntry]], None] = Field(
        None, description="held-out rows, as dataset; null: val_size of the training rows")
    val_size: float = Field(
        0.0, ge=0, description="rows held out for evaluation: < 1 a share of the training rows, >= 1 a count")
    formatting: Literal[FORMATTINGS] = Field(
        "auto", description="auto | prompt_completion | alpaca | role | openai | sharegpt | text | preference (for "
                            "entries that set none)")
    columns: dict[str, str] | None = Field(
        None, description="other column names for the standard ones, e.g. {prompt: question, completion: answer}")
    template: str | None = Field(
        None, description="chat template: chatml | llama3 | path/to/template.jinja; null: the tokenizer's own")
    cutoff_len: int = Field(1024, ge=2, description="longest sequence in tokens")
    on_bad_rows: Literal["error", "skip"] = Field(
        "error", description="error | skip: a row that cannot be read stops the run, or is skipped and counted")
    max_samples: int | None = Field(
        None, ge=1, description="use at most this many rows (of the weighted mix); null: all")

    def dataset_entries(self, which: str = "dataset") -> list[DatasetEntry]:
        value = getattr(self, which)
        if value is None:
            return []
        items = value if isinstance(value, list) else [value]
        return [DatasetEntry(path=i, formatting=self.formatting, columns=self.columns) if isinstance(i, str) else i
                for i in items]


class SequenceArgs(_Strict):
    """Keys of the stages that train on whole tokenized sequences in the one loop (sft, rm, dpo, kto);
    RL prompts keep their last cutoff_len tokens instead, and its batches are rollouts."""

    overlong: Literal["truncate", "drop"] = Field(
        "truncate", description="a sample longer than cutoff_len: truncate (keep its first tokens) | drop")
    group_by_length: bool = Field(True, description="batch similar lengths together: little padding")
    mask_reasoning: bool = Field(
        False, description="keep assistants' reasoning (reasoning_content / thinking) out of the loss")
    preprocessing_num_workers: int | None = Field(
        None, ge=1, description="tokenize in this many processes; null: in this one")
    # Keyed by the rows, tokenizer, template, cutoff and masking: a rerun reads it back instead of tokenizing again.
    tokenized_cache: bool = Field(
        True, description="keep the tokenized data on disk ($POSTTRAIN_CACHE or ~/.cache/posttrain, tokenized/)")


class SFTDataArgs(_Strict):
    """What SFT alone trains on: the preference and RL stages train on the response only, unpacked."""

    train_on_prompt: bool = Field(False, description="train on the prompt tokens too, not only the assistant turns")
    mask_history: bool = Field(False, description="train only the last assistant turn")
    packing: bool = Field(False, description="several samples per row, attention kept inside each sample")


class SFTConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, SFTDataArgs):
    """`posttrain sft`: supervised fine-tuning on conversations, or continued pre-training on text."""

    stage: Literal["sft"] = Field("sft", description="the command this file is for")
    learning_rate: float = Field(1e-4, gt=0)


class ReferenceArgs(_Strict):
    """Where the reference log-probs of the DPO family and KTO come from (computed once, cached)."""

    ref_model: str | None = Field(None, description="the reference model folder; null: the starting model itself")
    ref_cache_dir: str | None = Field(
        None, description="where reference log-probs are cached; null: $POSTTRAIN_CACHE or ~/.cache/posttrain, "
                          "reference_logps/")


class RMConfig(TrainArgs, DataArgs, SequenceArgs):
    """`posttrain rm`: a reward model (scalar head) trained on preference pairs, Bradley-Terry loss."""

    stage: Literal["rm"] = Field("rm", description="the command this file is for")
    learning_rate: float = Field(1e-5, gt=0)
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="+ c * (r_chosen + r_rejected)^2 in the loss: rewards kept near 0")
    lm_coefficient: float = Field(
        0.0, ge=0, description="+ c * per-token NLL of the chosen response (the LM head; GRM's SFT term)")


class DPOConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, ReferenceArgs):
    """`posttrain dpo`: the DPO family (sigmoid, ipo, hinge, robust, bco_pair) and the reference-free
    SimPO and ORPO, on preference pairs."""

    stage: Literal["dpo"] = Field("dpo", description="the command this file is for")
    learning_rate: float = Field(5e-6, gt=0)
    pref_loss: Literal[PREF_LOSSES] = Field(
        "sigmoid", description="sigmoid (DPO) | ipo | hinge | robust | simpo | orpo | bco_pair")
    pref_beta: float = Field(0.1, gt=0, description="beta of the loss; ORPO's lambda")
    pref_ftx: float = Field(
        0.0, ge=0, description="weight of an NLL term on the chosen response, RPO")
    dpo_label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="label smoothing of sigmoid (cDPO) and robust")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")

    @model_validator(mode="after")
    def _check_smoothing(self):
        if self.dpo_label_smoothing and self.pref_loss not in ("sigmoid", "robust"):
            raise ValueError(f"dpo_label_smoothing is for pref_loss sigmoid or robust, not {self.pref_loss!r}")
        return self


class KTOConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, ReferenceArgs):
    """`posttrain kto`: KTO on unpaired rows (a response and a true/false label)."""

    stage: Literal["kto"] = Field("kto", description="the command this file is for")
    learning_rate: float = Field(5e-6, gt=0)
    pref_beta: float = Field(0.1, gt=0, description="beta of the loss")
    pref_ftx: float = Field(0.0, ge=0, description="weight of an NLL term on desirable rows")
    kto_chosen_weight: float = Field(1.0, gt=0, description="weight of desirable rows")
    kto_rejected_weight: float = Field(1.0, gt=0, description="weight of undesirable rows")


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
        None, description="a folder written by `posttrain rm` (normalized with its saved mean/std)")
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
        None, description="gae: the critic's starting folder; null: reward_model if given, else model_name_or_path")
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
        for key in ("alarms", "stop_on_alarms"):
            unknown = sorted(set(getattr(self, key)) - set(ALARM_DEFAULTS))
            if unknown:
                raise ValueError(f"{key}: unknown {', '.join(unknown)}; known: {', '.join(ALARM_DEFAULTS)}")
        if not self.reward_model and not self.reward_funcs:
            raise ValueError("no reward: set reward_model (a `posttrain rm` folder) and/or reward_funcs "
                             "(exact_match, numeric_match, format:REGEX, file.py:function, http://...)")
        return self


class PPOConfig(RLConfig):
    stage: Literal["ppo"] = Field("ppo", description="the command this file is for")


class GRPOConfig(RLConfig):
    stage: Literal["grpo"] = Field("grpo", description="the command this file is for")


class ExportConfig(_Strict):
    """`posttrain export`: merge a LoRA adapter into its base and write a standalone model folder."""

    model_name_or_path: str | None = Field(
        None, description="the base folder; null: the base named in the adapter's adapter_config.json")
    adapter_name_or_path: str = Field(description="the LoRA adapter folder to merge")
    export_dir: str = Field(description="where the merged model goes")
    export_dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "auto", description="auto (the base's own dtype) | float32 | bfloat16 | float16")
    overwrite_output_dir: bool = Field(False, description="replace an export_dir that holds an earlier export")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


def _one_or_list(value: Any) -> Any:
    """A single value where a list is expected (`api_key: KEY`, one --flag) is a list of one."""
    return [value] if isinstance(value, str) else value


class ServeConfig(_Strict):
    """`posttrain serve`: an OpenAI-compatible server of one base model and many adapters.

    Keys that `vllm serve` also has carry its names (model, served_model_name, host, port, api_key,
    max_model_len, max_loras, dtype, seed); its chat_template, lora_modules and max_num_seqs are aliases.
    """

    model: str = Field(description="the base model folder")
    served_model_name: str | None = Field(None, description="the base model's name in the API; null: its folder's")
    template: str | None = Field(
        None, description="chat template of the base and of adapters that ship none: a built-in name or a .jinja "
                          "path; null: the model's own (a posttrain stage saves it with its output)")
    adapters: dict[str, str] = Field(
        default_factory=dict, description="serve these PEFT adapter folders as models: {name: path}, or NAME=PATH "
                                          "items (--adapter NAME=PATH)")
    adapter_dirs: list[str] = Field(
        default_factory=list, description="serve every adapter folder inside these, named after its folder; runtime "
                                          "loads may only come from them")
    allow_runtime_adapters: bool = Field(
        False, description="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    max_loras: int = Field(8, ge=1, description="LoRA adapters resident at once (the least recently used leave)")
    max_runtime_adapters: int = Field(
        16, ge=1, description="adapters loaded through the API at once; more are refused until one is unloaded")
    api_key: list[str] = Field(
        default_factory=list, description="require 'Authorization: Bearer KEY' on every route but /health: a key or "
                                          "a list ($POSTTRAIN_API_KEY adds one); empty: no key")
    host: str = Field("127.0.0.1", description="the address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="the port to listen on; 0: any free port")
    max_batch_size: int = Field(32, ge=1, description="sequences decoded together")
    max_model_len: int | None = Field(None, ge=1, description="context length in tokens; null: the model's")
    max_prompt_tokens: int | None = Field(None, ge=1, description="longest prompt accepted; null: max_model_len - 1")
    max_tokens_limit: int | None = Field(
        None, ge=1, description="largest max_tokens a request may ask for; null: max_model_len")
    max_n: int = Field(8, ge=1, description="most completions one request may ask for (n)")
    max_body_bytes: int = Field(1 << 20, ge=1, description="largest request body in bytes")
    max_concurrent_requests: int = Field(256, ge=1, description="requests generating at once; more get HTTP 429")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto | cpu | cuda (auto: cuda if present)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16")
    seed: int | None = Field(None, description="seed of the sampled requests that give none; null: unseeded")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")
    backend: Literal["engine", "vllm", "auto"] = Field(
        "engine", description="engine (built in: LoRA, prompt, P- and prefix-tuning adapters in one batch) | vllm "
                              "(vLLM's OpenAI server behind this one: LoRA adapters) | auto (vllm on CUDA when "
                              "installed and every adapter is LoRA, else the engine)")
    vllm_python: str | None = Field(
        None, description="vllm: the Python of an environment with vLLM; null: $POSTTRAIN_VLLM_PYTHON, else this "
                          "Python when it imports vllm")

    @field_validator("adapters", mode="before")
    @classmethod
    def _adapters_from_pairs(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            return value  # a mapping, or something pydantic refuses with the type it wants
        adapters: dict[str, str] = {}
        for item in _one_or_list(value):
            name, sep, path = item.partition("=") if isinstance(item, str) else ("", "", "")
            if not (sep and name and path):
                raise ValueError(f"{item!r}: an adapter is given as NAME=PATH")
            if name in adapters:
                raise ValueError(f"adapter {name!r} is given twice")
            adapters[name] = path
        return adapters

    @field_validator("adapter_dirs", "api_key", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return _one_or_list(value)

    @model_validator(mode="after")
    def _check_serve(self):
        if any(not key for key in self.api_key):
            raise ValueError("api_key (--api-key) must not be empty")
        if self.allow_runtime_adapters and not self.adapter_dirs:
            raise ValueError("allow_runtime_adapters needs at least one folder in adapter_dirs (--adapter-dir DIR): "
                             "runtime loads may only come from folders you allowed")
        return self


class ScoreConfig(_Strict):
    """`posttrain score`: score prompt/response rows, or chosen/rejected pairs, with a reward model."""

    model: str = Field(description="a reward-model folder written by `posttrain rm`")
    data: str = Field(description="rows in any SFT format (the last assistant message is scored), or preference "
                                  "pairs (the pair accuracy is reported)")
    output: str | None = Field(None, description="write one JSON line per row here; null: print them")
    template: str | None = Field(
        None, description="chat template; null: the one the model was trained with, else the tokenizer's")
    batch_size: int = Field(16, ge=1, description="rows scored together")
    cutoff_len: int | None = Field(
        None, ge=2, description="longer rows keep their first tokens, as `posttrain rm` trains (a warning counts "
                                "them); null: the model's training cutoff_len, else 4096")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


class ChatConfig(_Strict):
    """`posttrain chat`: talk to a model folder, interactively or one-shot (prompt)."""

    model: str = Field(description="a model folder, or an adapter folder (its base loads under it)")
    adapter: str | None = Field(None, description="a PEFT adapter folder to apply on top of model")
    prompt: str | None = Field(None, description="answer this one message and exit; null: interactive")
    system: str | None = Field(None, description="a system message in front of the conversation")
    template: str | None = Field(
        None, description="chat template: a built-in name or a .jinja path; null: the folder's own")
    max_new_tokens: int | None = Field(
        None, ge=1, description="longest answer in tokens; null (and at most): what the context leaves after the "
                                "prompt")
    temperature: float = Field(0.0, ge=0, description="sampling temperature; 0: greedy")
    trust_remote_code: bool = Field(False, description="run Python code shipped in the model folder")


def _default_compare_methods() -> list[str]:
    from posttrain.compare import DEFAULT_METHODS

    return list(DEFAULT_METHODS)


class CompareConfig(_Strict):
    """`posttrain compare`: full vs LoRA vs P-tuning (or other methods) on the embedded task or your own data,
    one measured table."""

    output_dir: str = Field("runs/compare", description="where each method's run and the table go")
    methods: list[str] = Field(
        default_factory=_default_compare_methods, description="full | lora | ptuning | prompt_tuning | "
                                                              "prefix_tuning | freeze: a list, or comma-separated")
    steps: int = Field(400, ge=1, description="optimizer steps, the same for every method")
    batch_size: int = Field(32, ge=1, description="rows per step, the same for every method")
    base: str | None = Field(None, description="a local model folder to start from; null: a fresh tiny model")
    data: str | None = Field(
        None, description="SFT rows in any SFT format, a tenth (at most 200) held out and scored by exact match of "
                          "the last assistant turn; null: the embedded task")
    template: str | None = Field(
        None, description="chat template every method trains and answers with: a built-in name or a .jinja path; "
                          "null: the base's own")

    @field_validator("methods", mode="before")
    @classmethod
    def _split_methods(cls, value: Any) -> Any:
        if not isinstance(value, (str, list)):
            return value
        return [part.strip() for item in _one_or_list(value)
                for part in (item.split(",") if isinstance(item, str) else [item])]

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from posttrain.compare import METHODS

        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}" if unknown
                             else f"no method to compare; choose from {', '.join(METHODS)}")
        return methods


STAGES: dict[str, type[BaseModel]] = {"sft": SFTConfig, "export": ExportConfig}

STAGES.update({"rm": RMConfig, "dpo": DPOConfig, "kto": KTOConfig})
STAGES.update({"ppo": PPOConfig, "grpo": GRPOConfig})

# The commands that also take each key as a --flag (their options before they took config files:
# `posttrain serve MODEL --port 8001` keeps working), and every command with a config.
FLAG_COMMANDS: dict[str, type[BaseModel]] = {"serve": ServeConfig, "score": ScoreConfig, "chat": ChatConfig,
                                             "compare": CompareConfig}
COMMANDS: dict[str, type[BaseModel]] = {**STAGES, **FLAG_COMMANDS}
_FLAG_NAMES = {"adapters": "--adapter", "adapter_dirs": "--adapter-dir"}  # given once per item


def flag_name(key: str) -> str:
    """The --flag that sets `key`: its name with dashes (singular for the lists given once per item)."""
    return _FLAG_NAMES.get(key, "--" + key.replace("_", "-"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key=value` strings to a nested dict; values are parsed as YAML (`lr=1e-4`, `packing=true`)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not of the form key=value")
        key, raw = pair.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw else None
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"{key}='\"...\"'") from None
        node = out
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {pair!r}: {key!r} is not a key name (use key=value or key.subkey=value)")
        for depth, p in enumerate(parts[:-1]):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r}: {'.'.join(parts[:depth + 1])!r} is already set to a plain "
                                  "value, so it has no sub-keys; set one or the other")
        node[parts[-1]] = value
    return out


def _apply_aliases(raw: dict[str, Any], command: str) -> dict[str, Any]:
    out = dict(raw)
    for alias, key in ALIASES.get(command, {}).items():
        if alias in out:
            if key in out and out[key] != out[alias]:
                raise ConfigError(f"config sets both {alias!r} and {key!r} (same setting); keep one")
            out[key] = out.pop(alias)
    return out


def _format_error(err: ValidationError, cls: type[BaseModel]) -> str:
    lines = []
    known = list(cls.model_fields)
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(config)"
        if e["type"] == "extra_forbidden":
            elsewhere = [s for s, other in STAGES.items()
                         if other is not cls and str(e["loc"][-1]) in other.model_fields]
            close = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            if elsewhere and len(e["loc"]) == 1:
                lines.append(f"config key {key!r} is for {' / '.join(elsewhere)}, not for "
                             f"{_stage_name(cls)}; remove it")
            else:
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                lines.append(f"unknown config key {key!r}{hint}")
        elif e["type"] == "missing":
            lines.append(f"config key {_key_label(cls, key)} is required")
        elif not e["loc"]:  # a check across keys: its message names them
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"config key {_key_label(cls, key)}: {e['msg'].removeprefix('Value error, ')} "
                         f"(got {e.get('input')!r})")
    if len(lines) == 1:
        return f"invalid config: {lines[0]}"
    return "invalid config:\n  " + "\n  ".join(lines)


def _key_label(cls: type[BaseModel], key: str) -> str:
    """A key as its user may have typed it: with its --flag, for the commands that take flags."""
    if _stage_name(cls) in FLAG_COMMANDS and key in cls.model_fields:
        return f"{key!r} ({flag_name(key)})"
    return repr(key)


# Keys that name files or folders: checked for what the OS cannot take, before anything opens them.
PATH_KEYS = ("model_name_or_path", "adapter_name_or_path", "output_dir", "export_dir", "template", "ref_model",
             "ref_cache_dir", "reward_model", "critic_model", "resume_from_checkpoint", "deepspeed",
             "model", "adapter", "adapters", "adapter_dirs", "data", "output", "base")
MAX_PATH_BYTES, MAX_NAME_BYTES = 4096, 255


def check_path_value(key: str, value: str) -> None:
    if "\0" in value:
        raise ConfigError(f"{key}: {value!r} contains a NUL byte; no file name can")
    encoded = value.encode("utf-8", "surrogateescape")
    longest = max((len(part) for part in encoded.split(b"/")), default=0)
    if len(encoded) > MAX_PATH_BYTES or longest > MAX_NAME_BYTES:
        raise ConfigError(f"{key}: {value[:60]!r}... is too long for a path ({len(encoded)} bytes, a name of "
                          f"{longest}; the limits are {MAX_PATH_BYTES} and {MAX_NAME_BYTES})")


def _check_paths(config: BaseModel) -> None:
    for key in PATH_KEYS:
        value = getattr(config, key, None)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                check_path_value(key, item)
    if isinstance(config, DataArgs):
        for which in config.DATASET_KEYS:
            for entry in config.dataset_entries(which):
                check_path_value(which, entry.path)


def _stage_name(cls: type[BaseModel]) -> str:
    return next((s for s, c in COMMANDS.items() if c is cls), cls.__name__)


def build_config(cls: type[BaseModel], raw: dict[str, Any]):
    raw = _apply_aliases(raw, _stage_name(cls))
    # `key: null` for a required key (as `posttrain config` prints one not yet set) is the key not given.
    raw = {k: v for k, v in raw.items() if v is not None or k not in cls.model_fields or
           not cls.model_fields[k].is_required()}
    try:
        config = cls.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_error(err, cls)) from None
    _check_paths(config)
    return config


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"line {key_node.start_mark.line + 1}: key {key!r} is given twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_config(command: str, path: str | None, overrides: list[str] | None = None,
                defaults: dict[str, Any] | None = None, values: dict[str, Any] | None = None):
    """Read YAML (optional), then `values` (keys the command line set by --flag or position) and `key=value`
    overrides, into the command's typed config; `defaults` fill keys none of them sets."""
    raw: dict[str, Any] = dict(defaults or {})
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path!r} does not exist")
        try:
            loaded = yaml.load(p.read_text(), Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ConfigError(f"{path}: cannot be read ({err})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
        raw.update(loaded)
    given = parse_overrides(overrides or [])
    twice = sorted(set(values or {}) & set(given))
    if twice:
        raise ConfigError(f"{twice[0]} is given twice on the command line (as {flag_name(twice[0])} or by position, "
                          f"and as {twice[0]}=...); keep one")
    raw.update(values or {})
    raw.update(given)
    file_stage = raw.pop("stage", command)
    if file_stage != command:
        raise ConfigError(f"{path}: stage is {file_stage!r} but the command is {command!r}")
    return build_config(COMMANDS[command], raw)


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
