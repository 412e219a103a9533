"""Local stand-ins for real models' tokenizers, to test chat templates without a model hub.

Two kinds of tokenizer trained here in milliseconds, each reproducing the traps of the real ones:
  - byte-level BPE with Qwen2's split pattern (Qwen2.5 / Qwen3 / Llama-3.2): Llama's variant also
    adds its BOS in the encoder (a post-processor), as Llama-3's tokenizer does, while the template
    writes one too;
  - SentencePiece-style BPE (Phi-3 / Mistral / Gemma): Metaspace with a prefix space on the first
    section only (Phi-3, Mistral), so text tokenized on its own gets a `▁` that the same text inside
    the conversation does not; Gemma adds no prefix space but adds its BOS in the encoder.
The chat templates are the models' own, kept as jinja text under tests/data/templates/.
"""

from __future__ import annotations

import string
from functools import lru_cache
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "data" / "templates"

_CORPUS = [
    "You are a helpful assistant. Be brief.", "What is the weather in Paris today?", "It is sunny and 20 degrees.",
    "Reverse the string abc, then sort 312.", "The answer is cba and then 123.", "Thanks! Anything else?",
    'get_weather {"city": "Paris"} {"temperature": 20, "sky": "sunny"}', "Let me think about this step by step.",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n", "You are Qwen, created by Alibaba Cloud.",
    "# Tools\n\nYou may call one or more functions to assist with the user query.",
]

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
                r"\s+(?!\S)|\s+")
_BPE_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|eot_id|>",
                "<|start_header_id|>", "<|end_header_id|>"]
_BPE_ADDED = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
_SP_SPECIAL = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>",
               "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
               "[/TOOL_RESULTS]", "<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"]


@lru_cache(maxsize=None)
def _byte_level():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=_BPE_SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    return tok


@lru_cache(maxsize=None)
def _sentencepiece(prepend_scheme: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme=prepend_scheme)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=_SP_SPECIAL,
                                  initial_alphabet=list(string.printable) + ["▁"])
    tok.train_from_iterator(_CORPUS * 5, trainer=trainer)
    return tok


def _wrap(tok, template: str, bos_in_encoder: str | None = None, added: tuple[str, ...] = (), **special):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(tok.to_str())  # a copy: each model gets its own post-processor
    if bos_in_encoder:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_in_encoder} $A", special_tokens=[(bos_in_encoder, tok.token_to_id(bos_in_encoder))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if added:
        hf.add_tokens(list(added))
    hf.chat_template = (TEMPLATES / f"{template}.jinja").read_text()
    return hf


def model_tokenizer(name: str):
    """A tokenizer with the named model's chat template, special tokens and tokenizer traps."""
    if name in ("qwen2_5", "qwen3"):
        return _wrap(_byte_level(), name, added=tuple(_BPE_ADDED), eos_token="<|im_end|>", pad_token="<|endoftext|>")
    if name == "llama3_2":
        return _wrap(_byte_level(), name, bos_in_encoder="<|begin_of_text|>", bos_token="<|begin_of_text|>",
                     eos_token="<|eot_id|>")
    if name == "phi3":
        return _wrap(_sentencepiece("first"), name, bos_token="<s>", eos_token="<|endoftext|>", unk_token="<unk>")
    if name == "mistral_v0_3":
        return _wrap(_sentencepiece("first"), name, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if name == "gemma2":
        return _wrap(_sentencepiece("never"), name, bos_in_encoder="<bos>", bos_token="<bos>", eos_token="<eos>",
                     pad_token="<pad>", unk_token="<unk>")
    raise KeyError(name)


def trained_runs(tokenizer, sample) -> list[str]:
    """Decoded runs of consecutive trained tokens (each trained label must be its input token)."""
    from posttrain.data.chat import IGNORE_INDEX

    runs, cur = [], []
    for tok, lab in zip(sample.input_ids, sample.labels):
        if lab != IGNORE_INDEX:
            assert lab == tok
            cur.append(tok)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tokenizer.decode(r) for r in runs]
