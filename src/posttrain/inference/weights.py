"""The tensors of a Llama-family decoder, read straight from a transformers model.

The engine runs its own forward pass (see forward.py) over these tensors instead of calling the
HF modules: it needs per-row KV positions, per-row LoRA deltas and no per-call mask/cache objects.
Which models qualify is a whitelist, checked here once: an architecture whose layers hold
anything this forward does not compute (QK-norm, a different norm, a different MLP activation,
length-dependent RoPE) is refused with the reason, never run approximately.

`fuse=True` concatenates q/k/v and gate/up into single matmuls (a server's frozen weights: faster,
a second copy of those matrices); `fuse=False` keeps references to the live parameters, so a model
that is still training is generated from with its current weights.

A PEFT LoRA model (plain LoRA or rsLoRA on linear layers: an RL actor, an adapter loaded for chat)
runs too: each adapted matrix is held merged, W + scaling * B @ A, in a copy of its own. The copy
is a snapshot; `refresh()` recomputes it in place from the current A and B (the rollout sampler
calls it before every batch of rollouts, since the actor trains in between). Anything the merge
would not reproduce (DoRA and other variants, LoRA biases, adapted embeddings, modules_to_save
copies, prompt learning) is refused, never generated from approximately.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from posttrain.errors import ConfigError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # inv_freq does not depend on the sequence length


@dataclass
class Projection:
    """One or more linear maps applied to the same input; outputs are `sizes` wide, in order."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    sizes: list[int]

    def __call__(self, x: torch.Tensor, deltas: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """The outputs, each plus its delta when one is given (deltas align with the outputs)."""
        if len(self.weights) == 1:
            out = torch.nn.functional.linear(x, self.weights[0], self.biases[0])
            outs = list(out.split(self.sizes, dim=-1)) if len(self.sizes) > 1 else [out]
        else:
            outs = [torch.nn.functional.linear(x, w, b) for w, b in zip(self.weights, self.biases)]
        if deltas is not None:
            outs = [o if d is None else o + d for o, d in zip(outs, deltas)]
        return outs


@dataclass
class LayerWeights:
    input_norm: torch.Tensor
    qkv: Projection  # outputs q, k, v
    o: Projection
    post_norm: torch.Tensor
    gate_up: Projection  # outputs gate, up
    down: Projection


@dataclass
class ModelDims:
    hidden: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int
    num_layers: int
    vocab: int
    eps: float
    max_positions: int
    model_type: str

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of every linear a LoRA adapter may target, by PEFT module name."""
        h, q, kv, i = self.hidden, self.q_size, self.kv_size, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


class _LoraMerge:
    """The engine's copy of a PEFT LoRA linear's effective weight, W + sum of scaling * B @ A."""

    def __init__(self, module: nn.Module, where: str):
        for name in module.active_adapters:
            variant = getattr(module, "lora_variant", {}).get(name) or getattr(module, "lora_bias", {}).get(name)
            if module.use_dora.get(name) or variant:
                raise ConfigError(f"{where}: adapter {name!r} is a LoRA variant (DoRA, LoRA bias, ...) the engine "
                                  "does not merge; merge it into the model first")
        self.module = module
        self.weight = module.get_base_layer().weight.detach().clone()
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        self.weight.copy_(self.module.get_base_layer().weight)
        if self.module.merged or self.module.disable_adapters:  # the base already holds it / adapters are off
            return
        for name in self.module.active_adapters:
            if name in self.module.lora_A:
                self.weight += self.module.get_delta_weight(name).to(self.weight.dtype)


def _is_lora_linear(module: nn.Module) -> bool:
    from peft.tuners.lora.layer import Linear

    return isinstance(module, Linear) and type(module.get_base_layer()) is nn.Linear


def _plain(module: nn.Module, where: str) -> nn.Module:
    """`module` itself, unless PEFT wraps it (an adapted embedding, a modules_to_save copy): reading its
    `.weight` would give the base's tensor and silently drop what the wrapper adds."""
    if type(module).__module__.startswith("peft"):
        raise ConfigError(f"{where} is wrapped by PEFT ({type(module).__name__}); the engine merges LoRA on linear "
                          "layers only — merge the adapter into the model first")
    return module


def _linear(module: nn.Module, where: str, merges: list[_LoraMerge]) -> tuple[torch.Tensor, torch.Tensor | None]:
    if _is_lora_linear(module):
        merges.append(_LoraMerge(module, where))
        bias = module.get_base_layer().bias
        return merges[-1].weight, bias.detach() if bias is not None else None
    if type(module) is not nn.Linear:  # e.g. a quantized or otherwise wrapped layer: never run approximately
        raise ConfigError(f"{where} is a {type(module).__name__}, not a plain nn.Linear; the engine runs plain "
                          "models and LoRA on linear layers — merge adapters first or serve them as adapters")
    return module.weight, module.bias


def _projection(modules: list[tuple[nn.Module, str]], fuse: bool, merges: list[_LoraMerge]) -> Projection:
    fuse = fuse and not any(_is_lora_linear(m) for m, _ in modules)  # merged copies are refreshed one by one
    pairs = [_linear(m, where, merges) for m, where in modules]
    sizes = [w.shape[0] for w, _ in pairs]
    if fuse and len(pairs) > 1:
        weight = torch.cat([w.detach() for w, _ in pairs], dim=0)
        biases = [b for _, b in pairs]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b.detach() if b is not None else weight.new_zeros(s) for b, s in zip(biases, sizes)])
        return Projection([weight], [bias], sizes)
    return Projection([w.detach() for w, _ in pairs], [b.detach() if b is not None else None for _, b in pairs], sizes)


def check_supported(config) -> None:
    """Raise ConfigError unless the engine's forward computes exactly what this architecture does."""
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"the inference engine supports model types {', '.join(SUPPORTED_MODEL_TYPES)}; "
                          f"this model is {model_type!r}")
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ConfigError(f"the inference engine supports hidden_act 'silu'; this model uses {config.hidden_act!r}")
    rope = getattr(config, "rope_parameters", None) or {}
    rope_type = rope.get("rope_type", "default")
    if rope_type not in STATIC_ROPE_TYPES:
        raise ConfigError(f"RoPE type {rope_type!r} depends on the sequence length; the engine supports "
                          f"{', '.join(STATIC_ROPE_TYPES)}")


class DecoderWeights:
    """Every tensor the forward pass reads, plus the RoPE cos/sin tables and the model's dimensions."""

    def __init__(self, model, fuse: bool = False, max_positions: int | None = None):
        model = _unwrap_lora(model)
        config = model.config
        check_supported(config)
        base = getattr(model, "model", None)
        if not all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
            raise ConfigError(f"{type(model).__name__} is not a plain transformers decoder (model.model.layers ...); "
                              "the engine runs unwrapped models only")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        limit = config.max_position_embeddings
        window = getattr(config, "sliding_window", None)
        if window:  # beyond the window the model attends differently; stay inside it instead of approximating
            limit = min(limit, window)
        self.dims = ModelDims(
            hidden=config.hidden_size, num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim, intermediate=config.intermediate_size, num_layers=config.num_hidden_layers,
            vocab=model.get_output_embeddings().weight.shape[0], eps=config.rms_norm_eps,
            max_positions=min(limit, max_positions or limit), model_type=config.model_type)
        self.merges: list[_LoraMerge] = []
        self.embed = _plain(base.embed_tokens, "model.embed_tokens").weight.detach()
        self.lm_head = _linear(model.get_output_embeddings(), "lm_head", self.merges)[0].detach()
        self.final_norm = _plain(base.norm, "model.norm").weight.detach()
        self.layers = []
        for i, layer in enumerate(base.layers):
            attn, mlp = layer.self_attn, layer.mlp
            where = f"model.layers.{i}"
            self.layers.append(LayerWeights(
                input_norm=_plain(layer.input_layernorm, f"{where}.input_layernorm").weight.detach(),
                qkv=_projection([(attn.q_proj, f"{where}.self_attn.q_proj"), (attn.k_proj, f"{where}.self_attn.k_proj"),
                                 (attn.v_proj, f"{where}.self_attn.v_proj")], fuse, self.merges),
                o=_projection([(attn.o_proj, f"{where}.self_attn.o_proj")], fuse, self.merges),
                post_norm=_plain(layer.post_attention_layernorm, f"{where}.post_attention_layernorm").weight.detach(),
                gate_up=_projection([(mlp.gate_proj, f"{where}.mlp.gate_proj"), (mlp.up_proj, f"{where}.mlp.up_proj")],
                                    fuse, self.merges),
                down=_projection([(mlp.down_proj, f"{where}.mlp.down_proj")], fuse, self.merges)))
        self.device = self.embed.device
        self.dtype = self.embed.dtype
        # The same computation as the model's rotary module (incl. llama3/yarn scaling), done once for all positions.
        positions = torch.arange(self.dims.max_positions, device=self.device)[None]
        with torch.no_grad():
            cos, sin = base.rotary_emb(self.embed[:1], positions)
        self.cos, self.sin = cos[0], sin[0]  # [max_positions, head_dim]

    def refresh(self) -> None:
        """Recompute the merged LoRA copies from the adapters' current weights (in place, so captured CUDA
        graphs stay valid); nothing to do for a plain model, whose live parameters are read directly."""
        for merge in self.merges:
            merge.refresh()


def _unwrap_lora(model):
    """The transformers model inside a PEFT model whose adapters are LoRA (the engine merges them, see
    _LoraMerge); prompt-learning PEFT models stay wrapped and are refused by the structure checks."""
    if not hasattr(model, "get_base_model") or not hasattr(model, "peft_config"):
        return model
    types = {str(getattr(c, "peft_type", "")).split(".")[-1] for c in model.peft_config.values()}
    if types != {"LORA"}:
        raise ConfigError(f"the engine runs LoRA PEFT models; this one is {', '.join(sorted(types))} (serve it "
                          "as an adapter instead)")
    return model.get_base_model()
