"""Models and adapters for the engine and server tests, built locally.

The default tiny model is freshly initialised (std 0.02), so its greedy output repeats one token
and would hide almost any bug; `lively_model_dir` rescales its weights so every step's argmax
depends on the context. LoRA adapters get random non-zero B (PEFT starts B at zero, a no-op).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

CPU = torch.device("cpu")


def make_lively(src: Path, dst: Path, seed: int = 0) -> Path:
    from posttrain.model.loading import load_model, load_tokenizer

    tok = load_tokenizer(str(src))
    model = load_model(str(src), device=CPU)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * (0.75 if "embed" in name else 1.5) / p.shape[1] ** 0.5)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)
    return dst


def make_lora(base_dir: Path, out: Path, r: int, targets: list[str], seed: int, **kwargs) -> Path:
    from peft import LoraConfig, get_peft_model

    from posttrain.model.loading import load_model

    model = get_peft_model(load_model(str(base_dir), device=CPU),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, **kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(out)
    return out


def make_prompt_adapter(base_dir: Path, out: Path, kind: str, seed: int) -> Path:
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    from posttrain.model.loading import load_model

    config = {"prompt": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
              "ptune": PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32, task_type="CAUSAL_LM"),
              "prefix": PrefixTuningConfig(num_virtual_tokens=3, task_type="CAUSAL_LM")}[kind]
    model = get_peft_model(load_model(str(base_dir), device=CPU), config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    model.save_pretrained(out)
    return out


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="session")
def lively_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lively(tiny_model_dir, tmp_path_factory.mktemp("models") / "lively")


@pytest.fixture(scope="session")
def adapter_root(lively_model_dir, tmp_path_factory) -> Path:
    """An allowed adapter folder: three LoRAs of different ranks and targets, prompt-, P- and prefix-tuning adapters."""
    root = tmp_path_factory.mktemp("adapters")
    make_lora(lively_model_dir, root / "qv8", 8, ["q_proj", "v_proj"], seed=1)
    make_lora(lively_model_dir, root / "all4", 4, ALL_LINEAR, seed=2)
    make_lora(lively_model_dir, root / "mlp16", 16, ["up_proj", "down_proj"], seed=3, use_rslora=True)
    make_prompt_adapter(lively_model_dir, root / "prompt5", "prompt", seed=4)
    make_prompt_adapter(lively_model_dir, root / "ptune4", "ptune", seed=5)
    make_prompt_adapter(lively_model_dir, root / "prefix3", "prefix", seed=6)
    return root


def reference_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding, ignoring end-of-sequence."""
    out = model.generate(torch.tensor([prompt], device=model.device),
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=model.device),
                         max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny-model ops are too small to gain from threads, and on a shared CPU each OpenMP barrier can
    cost a scheduler quantum (20 ms per matmul measured here); restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
