"""The argument groups the training commands share, mixed into each command's config (stages.py, rl.py):
which parameters train, the loop, the data, QLoRA and prompt learning."""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

SCHEDULERS = ("linear", "cosine", "cosine_with_min_lr", "constant", "constant_with_warmup", "polynomial",
              "inverse_sqrt")
FORMATTINGS = ("auto", "prompt_completion", "alpaca", "role", "openai", "sharegpt", "text", "preference")
PREF_LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "bco_pair")

FINETUNING_TYPES = ("full", "freeze", "lora", "qlora", "ptuning", "prompt_tuning", "prefix_tuning")


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


class ReferenceArgs(_Strict):
    """Where the reference log-probs of the DPO family and KTO come from (computed once, cached)."""

    ref_model: str | None = Field(None, description="the reference model folder; null: the starting model itself")
    ref_cache_dir: str | None = Field(
        None, description="where reference log-probs are cached; null: $POSTTRAIN_CACHE or ~/.cache/posttrain, "
                          "reference_logps/")
