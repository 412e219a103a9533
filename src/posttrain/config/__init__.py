"""One typed config per command, read from YAML plus `key=value` overrides (and `--flags` for the
commands that had them: serve, score, chat, compare).

Key names follow LLaMA-Factory / Hugging Face TrainingArguments (and `vllm serve` for serve), so a user's
existing YAML mostly works as it is. Unknown keys and invalid values are refused with the key's name and
what is allowed. `posttrain config COMMAND` prints every key with its default and description.

    args.py      the argument groups the training commands share (finetuning, loop, data, QLoRA, prompts)
    stages.py    sft, rm, dpo, kto
    rl.py        ppo / grpo: the estimator-dependent defaults, the alarms
    tools.py     export, serve, score, chat, compare
    loading.py   YAML, overrides and flags to a config: aliases, one-line errors, path checks, the registry
"""

from posttrain.config.args import (
    FINETUNING_TYPES, FORMATTINGS, PREF_LOSSES, SCHEDULERS, DataArgs, DatasetEntry, FinetuningArgs, TrainArgs)
from posttrain.config.loading import (
    ALIASES, COMMANDS, FLAG_COMMANDS, STAGES, _apply_aliases, build_config, check_path_value, flag_name, load_config,
    parse_overrides, save_config)
from posttrain.config.rl import (
    ADVANTAGE_ESTIMATORS, ALARM_DEFAULTS, GENERATION_BACKENDS, LOSS_AGG_MODES, GRPOConfig, PPOConfig, RLConfig)
from posttrain.config.stages import DPOConfig, KTOConfig, RMConfig, SFTConfig
from posttrain.config.tools import ChatConfig, CompareConfig, ExportConfig, ScoreConfig, ServeConfig

__all__ = [
    "ADVANTAGE_ESTIMATORS", "ALARM_DEFAULTS", "ALIASES", "COMMANDS", "FINETUNING_TYPES", "FLAG_COMMANDS", "FORMATTINGS",
    "GENERATION_BACKENDS", "LOSS_AGG_MODES", "PREF_LOSSES", "SCHEDULERS", "STAGES", "ChatConfig", "CompareConfig",
    "DPOConfig", "DataArgs", "DatasetEntry", "ExportConfig", "FinetuningArgs", "GRPOConfig", "KTOConfig", "PPOConfig",
    "RLConfig", "RMConfig", "SFTConfig", "ScoreConfig", "ServeConfig", "TrainArgs", "_apply_aliases", "build_config",
    "check_path_value", "flag_name", "load_config", "parse_overrides", "save_config",
]
