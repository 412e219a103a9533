"""A model's parameters counted from its config.json alone, no weight loaded: what the memory plan
(train/memory_plan.py) multiplies by bytes.

Llama-shaped decoders (llama, mistral, qwen2, qwen3) are counted from their shapes, as their
transformers modeling files build them (H hidden, V vocabulary, I intermediate, head_dim d,
heads h, key/value heads g):

    embeddings     V x H
    each layer     q_proj H -> h*d, k_proj and v_proj H -> g*d, o_proj h*d -> H (biases: llama's
                   attention_bias, qwen2's q/k/v, qwen3's attention_bias; qwen3's q_norm/k_norm d each),
                   gate_proj and up_proj H -> I, down_proj I -> H (llama's mlp_bias),
                   input_layernorm and post_attention_layernorm H each
    final norm     H
    head           lm_head V x H unless tied to the embeddings; a reward model's or critic's score H x 1

Any other architecture is built on the meta device (shapes only: no memory, no weights) and listed
from there. Names are the ones `named_parameters()` gives (a tied head once, as the embeddings), so
`trained_params` picks what a finetuning type trains by model/adapters.py's own rules, and counts
what PEFT adds (LoRA's A and B, DoRA's magnitudes, modules_to_save copies, virtual-token encoders).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from posttrain.errors import ConfigError

LLAMA_SHAPED = ("llama", "mistral", "qwen2", "qwen3")


class ShapesUnavailable(ConfigError):
    """config.json could not be read or its architecture built, so its parameters are unknown (a run goes on
    without a plan: loading the model says what is wrong, if anything is)."""


@dataclass(frozen=True)
class ModelShapes:
    model_type: str
    params: dict[str, tuple[int, ...]]  # name -> shape, as named_parameters() lists them
    linear: frozenset[str]  # the weights of nn.Linear modules (the output head included)
    head: str | None  # the output layer's weight; None when it is the (tied) embeddings
    lm_head: bool  # logits over the vocabulary (a causal LM); False: a scalar score head
    hidden: int
    intermediate: int
    kv_dim: int
    vocab: int
    layers: int
    layer_numel: int  # one decoder layer's parameters: what FSDP2 and ZeRO-3 gather at a time
    counted: str  # how: "config.json shapes" or "a meta-device model"

    @property
    def total(self) -> int:
        return sum(math.prod(s) for s in self.params.values())

    def numel(self, names) -> int:
        return sum(math.prod(self.params[n]) for n in names)

    @property
    def layer_matmul_numel(self) -> int:
        """The linear weights inside the decoder layers (autocast keeps a half copy of each for the backward)."""
        return self.numel(n for n in self.linear if n != self.head)

    @property
    def head_matmul_numel(self) -> int:
        """The output head's matrix, tied or not (the LM head multiplies every position by it)."""
        return self.vocab * self.hidden if self.lm_head else self.hidden


def read_model_config(name_or_path: str, key: str = "model_name_or_path", trust_remote_code: bool = False):
    """The model folder's config through transformers; nothing else in the folder is read."""
    folder = Path(name_or_path).expanduser()
    if not (folder / "config.json").is_file():
        from posttrain.model.loading import resolve_model_path

        resolve_model_path(name_or_path, key)  # says why: a hub id, an adapter folder, a missing folder
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError, TypeError) as err:
        raise ShapesUnavailable(f"{key}: {folder / 'config.json'} cannot be read by transformers "
                                f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None


def model_shapes(name_or_path: str, *, score_head: bool = False, key: str = "model_name_or_path",
                 trust_remote_code: bool = False) -> ModelShapes:
    """The parameters of the model folder as a causal LM, or (`score_head`) as a reward model / critic."""
    folder = Path(name_or_path).expanduser()
    config = read_model_config(name_or_path, key, trust_remote_code)
    stamp = (folder / "config.json").stat().st_mtime_ns  # a rewritten config.json is counted again
    return _shapes(str(folder.resolve()), stamp, score_head, trust_remote_code, key, config)


_COUNTED: dict[tuple, ModelShapes] = {}  # the fix search plans the same models many times


def _shapes(folder: str, stamp: int, score_head: bool, trust_remote_code: bool, key: str, config) -> ModelShapes:
    if (folder, stamp, score_head) not in _COUNTED:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        for needed in ("hidden_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
            if not isinstance(getattr(text, needed, None), int):
                raise ShapesUnavailable(f"{key}: {folder}/config.json has no {needed}; the memory plan counts a "
                                        "decoder's parameters from it")
        _COUNTED[folder, stamp, score_head] = (
            _llama_shapes(text, score_head) if text.model_type in LLAMA_SHAPED
            else _meta_shapes(config, text, score_head, trust_remote_code, folder))
    return _COUNTED[folder, stamp, score_head]


def _dims(text) -> dict:
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    return dict(hidden=hidden, intermediate=getattr(text, "intermediate_size", None) or 4 * hidden,
                kv_dim=kv_heads * head_dim, vocab=text.vocab_size, layers=text.num_hidden_layers)


def _llama_family(text) -> tuple[bool, bool, bool, bool]:
    """(q/k/v bias, o_proj bias, MLP biases, per-head q/k norms), as each family's modeling file builds them."""
    attention_bias = bool(getattr(text, "attention_bias", False))
    return {"llama": (attention_bias, attention_bias, bool(getattr(text, "mlp_bias", False)), False),
            "mistral": (False, False, False, False),
            "qwen2": (True, False, False, False),
            "qwen3": (attention_bias, attention_bias, False, True)}[text.model_type]


def _llama_shapes(text, score_head: bool) -> ModelShapes:
    dims = _dims(text)
    H, V, I, L = dims["hidden"], dims["vocab"], dims["intermediate"], dims["layers"]
    head_dim = getattr(text, "head_dim", None) or H // text.num_attention_heads
    q, kv = text.num_attention_heads * head_dim, dims["kv_dim"]
    qkv_bias, o_bias, mlp_bias, qk_norm = _llama_family(text)
    params: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, H)}
    linear: set[str] = set()

    def add_linear(name: str, out: int, inp: int, bias: bool) -> None:
        params[f"{name}.weight"] = (out, inp)
        linear.add(f"{name}.weight")
        if bias:
            params[f"{name}.bias"] = (out,)

    for i in range(L):
        p = f"model.layers.{i}."
        add_linear(p + "self_attn.q_proj", q, H, qkv_bias)
        add_linear(p + "self_attn.k_proj", kv, H, qkv_bias)
        add_linear(p + "self_attn.v_proj", kv, H, qkv_bias)
        add_linear(p + "self_attn.o_proj", H, q, o_bias)
        if qk_norm:
            params[p + "self_attn.q_norm.weight"] = (head_dim,)
            params[p + "self_attn.k_norm.weight"] = (head_dim,)
        add_linear(p + "mlp.gate_proj", I, H, mlp_bias)
        add_linear(p + "mlp.up_proj", I, H, mlp_bias)
        add_linear(p + "mlp.down_proj", H, I, mlp_bias)
        params[p + "input_layernorm.weight"] = (H,)
        params[p + "post_attention_layernorm.weight"] = (H,)
    params["model.norm.weight"] = (H,)
    head = None
    if score_head:
        head = "score.weight"
        add_linear("score", 1, H, False)
    elif not getattr(text, "tie_word_embeddings", False):
        head = "lm_head.weight"
        add_linear("lm_head", V, H, False)
    layer_numel = sum(math.prod(s) for n, s in params.items() if n.startswith("model.layers.0."))
    return ModelShapes(text.model_type, params, frozenset(linear), head, not score_head, **dims,
                       layer_numel=layer_numel, counted="config.json shapes")


def _meta_shapes(config, text, score_head: bool, trust_remote_code: bool, folder: str) -> ModelShapes:
    """Any other architecture: built by transformers on the meta device, where a tensor has a shape and no data."""
    import copy

    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if score_head:
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if score_head else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as err:  # noqa: BLE001 - whatever the architecture's own code raises: the plan is unavailable
        raise ShapesUnavailable(f"{folder}: cannot count the parameters of a {text.model_type!r} model from its "
                                f"config.json ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                                ) from None
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    linear = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)} & set(params)
    out = model.get_output_embeddings() if not score_head else None
    head = next((f"{name}.weight" for name, m in model.named_modules()
                 if m is out or (score_head and name.split(".")[-1] == "score")), None)
    head = head if head in params else None
    # The decoder layers are the classes the model lists as never split (what FSDP2 wraps one by one).
    classes = next((list(m._no_split_modules) for m in model.modules() if getattr(m, "_no_split_modules", None)), [])
    layer_sizes = [sum(p.numel() for p in m.parameters()) for m in model.modules() if type(m).__name__ in classes]
    return ModelShapes(text.model_type, params, frozenset(linear), head, not score_head, **_dims(text),
                       layer_numel=max(layer_sizes, default=0), counted="a meta-device model")


# -- what a finetuning type trains ------------------------------------------------------------------

@dataclass(frozen=True)
class Trained:
    added: int  # parameters the finetuning type adds: adapter matrices, virtual-token encoders, saved copies
    trainable: int  # parameters with gradients and AdamW state
    adapted: int  # base matrices LoRA adapts (a LoRA actor's rollout engine holds each of them merged)
    quantized: int  # base weights held in 4 or 8 bits (QLoRA)


_ADAPTER_KEYS = {"r": "lora_rank", "target_modules": "lora_target", "use_dora": "use_dora",
                 "modules_to_save": "modules_to_save", "num_virtual_tokens": "num_virtual_tokens",
                 "encoder_hidden_size": "encoder_hidden_size", "prefix_projection": "prefix_projection",
                 "encoder_reparameterization_type": "encoder_reparameterization_type"}


def _settings(args) -> dict:
    """The finetuning keys; a starting adapter's own adapter_config.json wins for the shapes it fixed."""
    keys = {key: getattr(args, key, None) for key in _ADAPTER_KEYS.values()}
    if getattr(args, "adapter_name_or_path", None):
        from posttrain.model.files import read_adapter_config

        saved = read_adapter_config(args.adapter_name_or_path)
        keys.update({ours: saved[theirs] for theirs, ours in _ADAPTER_KEYS.items() if saved.get(theirs) is not None})
    return keys


def _names(value) -> list[str]:
    if value is None:
        return []
    return [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else list(value)


def _module(weight: str) -> str:
    return weight.rsplit(".", 1)[0]


def _matches(module: str, target: str) -> bool:
    """A LoRA target names a module by its last part(s), as PEFT matches a list of target_modules."""
    return module == target or module.endswith("." + target)


def trained_params(shapes: ModelShapes, args, *, score_head: bool = False) -> Trained:
    """What `finetuning_type` (model/adapters.py) adds and trains on this model; `score_head`: a reward model,
    whose new head always trains (PEFT keeps a trained copy of it beside a LoRA adapter)."""
    from posttrain.model.adapters import SCALAR_HEADS, freeze_selector

    kind = args.finetuning_type
    head_names = [shapes.head] if score_head and shapes.head else []
    if kind == "full":
        return Trained(0, shapes.total, 0, 0)
    if kind == "freeze":
        trains = freeze_selector(args, shapes.layers)
        chosen = {n for n in shapes.params if trains(n)} | set(head_names)
        return Trained(0, shapes.numel(chosen), 0, 0)
    s = _settings(args)
    H, n_tokens = shapes.hidden, s["num_virtual_tokens"]
    enc = s["encoder_hidden_size"] or H
    if kind == "prompt_tuning":
        return Trained(n_tokens * H, n_tokens * H, 0, 0)
    if kind == "ptuning":
        if str(s["encoder_reparameterization_type"]).upper().endswith("LSTM"):
            # PEFT's PromptEncoder: a 2-layer bidirectional LSTM, then Linear(2e, 2e) and Linear(2e, H)
            lstm = 2 * (4 * enc * (H + enc) + 8 * enc) + 2 * (4 * enc * (2 * enc + enc) + 8 * enc)
            added = n_tokens * H + lstm + (2 * enc * 2 * enc + 2 * enc) + (2 * enc * H + H)
        else:  # Linear(H, e), Linear(e, e), Linear(e, H)
            added = n_tokens * H + (H * enc + enc) + (enc * enc + enc) + (enc * H + H)
        return Trained(added, added, 0, 0)
    if kind == "prefix_tuning":
        # PEFT sizes each layer's prefix as that layer's keys and values (the key/value width under GQA).
        width = 2 * shapes.layers * shapes.kv_dim
        added = (n_tokens * shapes.kv_dim + (shapes.kv_dim * enc + enc) + (enc * width + width)
                 if s["prefix_projection"] else n_tokens * width)
        return Trained(added, added, 0, 0)
    # lora / qlora
    rank, targets = s["lora_rank"], s["lora_target"]
    excluded = {shapes.head, *(n for n in shapes.linear if _module(n).split(".")[-1] in SCALAR_HEADS)}
    candidates = [n for n in shapes.linear if n not in excluded]
    if isinstance(targets, str) and targets != "all" and "," not in targets and not re.fullmatch(r"\w+", targets):
        chosen = [n for n in candidates if re.fullmatch(targets, _module(n))]  # PEFT reads a string as a regex
    elif _names(targets) == ["all"]:
        chosen = candidates
    else:
        chosen = [n for n in candidates if any(_matches(_module(n), t) for t in _names(targets))]
    added = adapted = 0
    for name in chosen:
        out, inp = shapes.params[name]
        added += rank * (inp + out) + (out if s["use_dora"] else 0)
        adapted += out * inp
    # PEFT keeps a trained copy of every module whose name ends with one of these (plain suffix, as PEFT matches)
    saved = _names(s["modules_to_save"]) + (["classifier", "score"] if score_head else [])
    copies = shapes.numel(n for n in shapes.params if any(_module(n).endswith(m) for m in saved))
    quantized = shapes.numel(candidates) if getattr(args, "quantization_bit", None) else 0
    return Trained(added + copies, added + copies, adapted, quantized)
