"""The embedded default model: a tiny Llama with a locally trained byte-level BPE tokenizer.

Written as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer.json,
chat template), so `AutoModelForCausalLM` / `AutoTokenizer` load it like any other checkpoint.
Nothing is downloaded: the tokenizer is trained here on the embedded task text.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from posttrain.data.synthetic import tokenizer_corpus

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "templates"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Sizes by name: "tiny" for tests and the quickstart (~0.8M params), "small" for benchmarks (~6M).
SIZES = {
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2),
    "small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4),
}


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Byte-level BPE; digits are split one per token so arithmetic stays learnable."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",  # the end of an assistant turn: generation stops here
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=2048,
    )
    hf.chat_template = (TEMPLATES_DIR / "chatml.jinja").read_text()
    return hf


def build_model(tokenizer, size: str = "tiny", seed: int = 0, max_position_embeddings: int = 2048,
                **shape: int) -> LlamaForCausalLM:
    """A Llama of the named size; `shape` replaces its entries (e.g. num_hidden_layers=16)."""
    if size not in SIZES:
        raise ValueError(f"unknown tiny-model size {size!r}; choose one of {sorted(SIZES)}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{**SIZES[size], **shape},
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def write_tiny_model(path: str | Path, size: str = "tiny", seed: int = 0, **shape: int) -> Path:
    """Write model + tokenizer to `path` (an ordinary HF folder) and return it; `shape` as in build_model."""
    path = Path(path)
    tokenizer = build_tokenizer()
    model = build_model(tokenizer, size=size, seed=seed, **shape)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
