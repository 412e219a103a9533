"""Reward models: a causal LM body with a scalar head, saved as an ordinary HF sequence-classification folder.

A reward model is `AutoModelForSequenceClassification` with `num_labels=1` (for a Llama:
`LlamaForSequenceClassification`, a bias-free `score` Linear(hidden, 1) on the decoder). Built from a
causal-LM folder, the body keeps its weights, the LM head is dropped and `score` starts fresh. The
reward of a sequence is the head read at its LAST REAL token (found from the attention mask, so it
works whatever the pad token is, even when pad == eos).

The trained folder loads back with plain transformers:

    AutoModelForSequenceClassification.from_pretrained(folder)   # logits[:, 0] is the reward

`config.json` also holds the reward mean and std over the training data (`reward_mean`,
`reward_std`), so a later stage (RLHF) can normalize rewards: (r - reward_mean) / reward_std.
The same head read at every position gives per-token values (`token_values`), which is what a PPO
critic needs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from posttrain.errors import ConfigError
from posttrain.model.loading import build_on_meta, check_attn_implementation, finish_loading, resolve_model_path
from posttrain.model.parts import hf_model, value_parts


def load_reward_model(name_or_path: str, *, device: torch.device, trust_remote_code: bool = False,
                      attn_implementation: str = "sdpa", gradient_checkpointing: bool = False,
                      dtype: torch.dtype = torch.float32, pad_token_id: int | None = None, on_meta: bool = False):
    """A reward model from a reward-model folder, or a new head on a causal-LM folder; `on_meta`: its structure
    only, on the meta device (FSDP2's low-memory load, model/loading.py `build_on_meta`)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    check_attn_implementation(attn_implementation)
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    if config.num_labels != 1 and _is_classifier(config):
        raise ConfigError(f"{name_or_path}: a sequence classifier with {config.num_labels} labels, not a reward "
                          "model (one scalar output)")
    config.num_labels = 1
    if pad_token_id is not None and config.pad_token_id is None:
        config.pad_token_id = pad_token_id  # lets plain transformers batch the saved model too
    if on_meta:
        model = build_on_meta(AutoModelForSequenceClassification, path, config, trust_remote_code=trust_remote_code,
                              attn_implementation=attn_implementation, dtype=dtype)
        return finish_loading(model, gradient_checkpointing)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is expected on a causal-LM folder
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code, attn_implementation=attn_implementation,
            dtype=dtype)
    except ValueError as err:
        raise ConfigError(f"{name_or_path}: cannot build a reward model from this folder "
                          f"(no sequence-classification class for its architecture?): {err}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    model.to(device)
    return finish_loading(model, gradient_checkpointing)


def implicit_reward_settings(name_or_path: str | Path) -> dict | None:
    """For a folder written by `posttrain dpo` with a loss that has a reference: {"reference": folder, "beta": float,
    "adapter_on_reference": bool (a LoRA policy whose base is its reference, scored with the adapter off)}. Its
    implicit reward, beta * log(pi(y|x) / pi_ref(y|x)), scores responses (train/reward_scoring.py). None for any
    other folder."""
    import yaml

    from posttrain.model.files import adapter_base, check_adapter_files
    from posttrain.train.dpo import REFERENCE_FREE

    folder = Path(name_or_path).expanduser()
    recorded = folder / "posttrain_config.yaml"
    try:
        config = yaml.safe_load(recorded.read_text()) if recorded.is_file() else None
    except (OSError, yaml.YAMLError):
        config = None
    if not isinstance(config, dict) or config.get("stage") != "dpo":
        return None
    loss = config.get("pref_loss", "sigmoid")
    if loss in REFERENCE_FREE:
        raise ConfigError(f"{name_or_path}: a `posttrain dpo` folder trained with pref_loss {loss}, which has no "
                          "reference model and so no implicit reward to score with; use a folder trained with a "
                          "reference (pref_loss sigmoid, ipo, ...) or a reward model from `posttrain rm`")
    adapter = (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file()
    if not adapter and not (folder / "config.json").is_file():
        raise ConfigError(f"{name_or_path}: a `posttrain dpo` folder with no model in it yet (no config.json or "
                          "adapter_config.json): score with it once its run has finished")
    base = adapter_base(folder, check_adapter_files(folder, str(name_or_path)),
                        f"set ref_model in {recorded}") if adapter else None
    if config.get("ref_model") or base is None:
        reference = _as_launched(str(config.get("ref_model") or config.get("model_name_or_path")), folder, config,
                                 recorded)
    else:
        reference = base  # a LoRA run without ref_model: its reference is its base, as the adapter records it
    resolve_model_path(reference, f"{name_or_path}: the reference its DPO run recorded")
    same = base is not None and Path(base).resolve() == Path(reference).expanduser().resolve()
    return {"reference": reference, "beta": float(config.get("pref_beta", 0.1)), "adapter_on_reference": same}


def _as_launched(path: str, folder: Path, config: dict, recorded: Path) -> str:
    """A path a run recorded as given: relative to the folder that run was launched in, which its output folder
    (recorded the same way) tells. Not relative to here: a folder of that name here may be another model."""
    given = Path(path).expanduser()
    if given.is_absolute():
        return str(given)
    out = Path(str(config.get("output_dir", ""))).expanduser()
    here = folder.resolve()
    if not out.is_absolute() and out.parts and here.parts[-len(out.parts):] == out.parts:
        return str(Path(*here.parts[:-len(out.parts)]) / given)
    raise ConfigError(f"{folder}: its DPO run recorded its reference as {path!r}, relative to where it ran, which "
                      f"this folder no longer tells (moved since, or written to an absolute output_dir); set "
                      f"ref_model in {recorded} to the reference's folder")


def check_is_reward_model(name_or_path: str, what: str = "model_name_or_path") -> None:
    """Scoring with a causal-LM folder would put a new, random head on it and report noise as rewards, unless
    `posttrain dpo` wrote it: that one scores with its implicit reward."""
    if implicit_reward_settings(name_or_path) is not None:
        return
    path = resolve_model_path(name_or_path, what)
    try:
        architectures = json.loads((path / "config.json").read_text()).get("architectures") or []
    except (OSError, ValueError, AttributeError):
        raise ConfigError(f"{name_or_path}: config.json is not a readable JSON object") from None
    if not any(str(a).endswith("ForSequenceClassification") for a in architectures):
        shown = ", ".join(map(str, architectures)) or "not recorded"
        raise ConfigError(f"{name_or_path}: not a reward model (its architecture is {shown}, with no scalar "
                          "head); train one with `posttrain rm`, or give a `posttrain dpo` folder (scored by its "
                          "implicit reward)")


def _is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def reward_head(model: nn.Module) -> nn.Module:
    return value_parts(model)[1]


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position of each row's last real token, for right- or left-padded rows."""
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(dim=1)


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One scalar per row: the head applied to the hidden state of the row's last real token."""
    return rewards_from_hidden(model, last_hidden_states(model, input_ids, attention_mask), attention_mask)


def last_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The body's final hidden states, [rows, length, hidden] (what both the reward head and an LM head read)."""
    body, _ = value_parts(model)
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def rewards_from_hidden(model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head read at each row's last real token of `last_hidden_states`."""
    last = hidden[torch.arange(hidden.size(0), device=hidden.device), last_token_index(attention_mask)]
    return reward_head(model)(last).squeeze(-1).float()


def language_model_head(model: nn.Module, name_or_path: str, *, device: torch.device,
                        trust_remote_code: bool = False) -> nn.Module:
    """The output layer of the causal LM a reward model was built from, over the same body, for an LM
    term during training (never saved with the reward model). A model that ties its embeddings reads
    them (they train with the body); otherwise the folder's own output layer is loaded, frozen."""
    hf = hf_model(model)
    if hf.config.tie_word_embeddings:
        return _TiedHead(hf.get_input_embeddings())
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_model_path(name_or_path)
    if _is_classifier(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)):
        raise ConfigError(f"{name_or_path}: a reward-model folder has no LM output layer (and its embeddings are "
                          "not tied); start from a causal-LM folder or set lm_coefficient: 0")
    head = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code).get_output_embeddings()
    return head.requires_grad_(False).to(device)


class _TiedHead(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.embeddings.weight.T


def token_values(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The head at every position, [rows, length]: a PPO critic's per-token value estimates."""
    return reward_head(model)(last_hidden_states(model, input_ids, attention_mask)).squeeze(-1).float()


def set_reward_stats(model: nn.Module, mean: float, std: float) -> None:
    """Store the training data's reward mean / std in the config (saved in config.json)."""
    config = hf_model(model).config
    config.reward_mean = float(mean)
    config.reward_std = float(std)


def trained_settings(folder: str | Path) -> dict:
    """The template and cutoff_len a reward model was trained with (its posttrain_config.yaml), where known:
    scoring must render and cut responses as training did, or the head reads positions it never learned."""
    import yaml

    path = Path(folder) / "posttrain_config.yaml"
    if not path.is_file():
        return {}
    config = yaml.safe_load(path.read_text()) or {}
    return {k: config[k] for k in ("template", "cutoff_len") if config.get(k) is not None}


def trained_template(recorded: str | None, tokenizer) -> str | None:
    """The template `posttrain rm` trained with: the recorded `template:` where it still resolves, else the
    folder's own (the stage saved the template it used into the folder's tokenizer; a .jinja path recorded
    relative to another working directory, or since moved, need not be found again)."""
    from posttrain.data.chat import resolve_template

    if recorded and tokenizer.chat_template:
        try:
            resolve_template(recorded, tokenizer)
        except ConfigError:
            return None
    return recorded


def reward_stats(folder: str | Path) -> tuple[float, float] | None:
    """(mean, std) saved with a reward model, or None if it has none."""
    config = json.loads((Path(folder) / "config.json").read_text())
    if "reward_mean" in config and "reward_std" in config:
        return float(config["reward_mean"]), float(config["reward_std"])
    return None
