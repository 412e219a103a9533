"""Model and adapter folders as users hand them to commands: broken files give one clear line (exit 2)
before any work; adapters find their base from anywhere; every generation path gives the same text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from inference_fixtures import CPU, adapter_root, lively_model_dir, make_lora  # noqa: F401

from conftest import sft_overrides
from posttrain.cli import main


class Pickled:
    """Not a tensor: a pickle holding one would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("unpickled",))


# -- ways to break a folder ------------------------------------------------------------------------

def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def edit_json(path: Path, **changes) -> None:
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def pickle_objects(folder: Path, name: str) -> None:
    for old in folder.glob("*.safetensors"):
        old.unlink()
    torch.save({"weight": torch.zeros(2), "payload": Pickled()}, folder / name)


MODEL_BREAKS = {
    "truncated model safetensors": (lambda d: truncate(d / "model.safetensors"), "cannot read safetensors"),
    "model config.json not JSON": (lambda d: (d / "config.json").write_text('{"model_type": "llama",'),
                                   "config.json is not valid JSON"),
    "model pickle with objects": (lambda d: pickle_objects(d, "pytorch_model.bin"), "pickled objects other than tensors"),
}
ADAPTER_BREAKS = {
    "truncated adapter safetensors": (lambda d: truncate(d / "adapter_model.safetensors"), "cannot read safetensors"),
    "adapter r not a number": (lambda d: edit_json(d / "adapter_config.json", r="eight"),
                               "r must be a positive integer, got 'eight'"),
    "adapter lora_alpha not a number": (lambda d: edit_json(d / "adapter_config.json", lora_alpha="x"),
                                        "lora_alpha must be a positive number"),
    "adapter r zero": (lambda d: edit_json(d / "adapter_config.json", r=0), "r must be a positive integer, got 0"),
    "adapter lora_alpha zero": (lambda d: edit_json(d / "adapter_config.json", lora_alpha=0),
                                "lora_alpha must be a positive number, got 0"),
    "adapter without weights": (lambda d: (d / "adapter_model.safetensors").unlink(), "no adapter weights"),
    "adapter pickle with objects": (lambda d: pickle_objects(d, "adapter_model.bin"),
                                    "pickled objects other than tensors"),
    "unknown adapter type": (lambda d: edit_json(d / "adapter_config.json", peft_type="IA3"),
                             "adapter type 'IA3' is not supported; posttrain loads LORA"),
}


def command(name: str, model: Path, adapter: Path | None, data: Path, out: Path) -> list[str]:
    if name == "sft":
        extra = dict(finetuning_type="lora", adapter_name_or_path=adapter) if adapter else {}
        return ["sft", *sft_overrides(model, data, out, max_steps=1, **extra)]
    if name == "chat":
        return ["chat", str(model), "--prompt", "hi", "--max-new-tokens", "2"] + (["--adapter", str(adapter)] if adapter else [])
    if name == "export":
        return ["export", f"adapter_name_or_path={adapter}", f"model_name_or_path={model}", f"export_dir={out}"]
    return ["score", str(model), str(data)]


@pytest.fixture(scope="module")
def good_lora(tiny_model_dir, tmp_path_factory) -> Path:
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "lora", 4, ["q_proj", "v_proj"], seed=0)


CASES = ([(case, cmd, "model") for case in MODEL_BREAKS for cmd in ("sft", "chat", "export", "score")]
         + [(case, cmd, "adapter") for case in ADAPTER_BREAKS for cmd in ("sft", "chat", "export")])


@pytest.mark.parametrize("case, cmd, part", CASES, ids=[f"{c}-{m}" for c, m, _ in CASES])
def test_a_broken_file_is_one_clear_line_before_any_work(case, cmd, part, tiny_model_dir, good_lora, task_data,
                                                         tmp_path, capsys):
    model, adapter = tmp_path / "model", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, model)
    shutil.copytree(good_lora, adapter)
    breaks, fragment = (MODEL_BREAKS if part == "model" else ADAPTER_BREAKS)[case]
    breaks(model if part == "model" else adapter)
    uses_adapter = part == "adapter" or cmd == "export"
    out = tmp_path / "out"
    assert main(command(cmd, model, adapter if uses_adapter else None, task_data, out)) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error: ") and fragment in err.strip().splitlines()[-1]
    assert not out.exists()  # refused before anything was written


def test_flash_attention_without_its_package_is_refused_before_loading(tiny_model_dir, task_data, tmp_path, capsys,
                                                                        monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else find_spec(name, *a))
    out = tmp_path / "out"
    assert main(["sft", *sft_overrides(tiny_model_dir, task_data, out, attn_implementation="flash_attention_2")]) == 2
    assert "flash_attention_2 needs the flash_attn package" in capsys.readouterr().err
    assert not out.exists()


def test_an_export_of_an_unsupported_type_says_so(tiny_model_dir, good_lora, tmp_path):
    from posttrain.config import ExportConfig
    from posttrain.errors import ConfigError
    from posttrain.export import run_export

    adapter = shutil.copytree(good_lora, tmp_path / "ia3")
    edit_json(adapter / "adapter_config.json", peft_type="IA3")
    with pytest.raises(ConfigError) as err:
        run_export(ExportConfig(adapter_name_or_path=str(adapter), model_name_or_path=str(tiny_model_dir),
                                export_dir=str(tmp_path / "out")))
    assert "virtual tokens" not in str(err.value) and "not supported" in str(err.value)


# -- an adapter's base, from anywhere --------------------------------------------------------------

def test_an_adapter_trained_from_a_relative_base_works_from_another_directory(tiny_model_dir, task_data, tmp_path,
                                                                              monkeypatch, capsys):
    work = tmp_path / "work"
    shutil.copytree(tiny_model_dir, work / "models" / "base")
    monkeypatch.chdir(work)
    assert main(["sft", *sft_overrides("models/base", task_data, "runs/lora", max_steps=1, finetuning_type="lora")]) == 0
    recorded = json.loads((work / "runs/lora/adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((work / "models/base").resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["chat", str(work / "runs/lora"), "--prompt", "hi", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err


def test_a_recorded_relative_base_is_found_beside_the_adapter_or_named_in_the_error(tiny_model_dir, good_lora,
                                                                                     tmp_path, monkeypatch, capsys):
    shutil.copytree(tiny_model_dir, tmp_path / "kit" / "base")
    adapter = shutil.copytree(good_lora, tmp_path / "kit" / "lora")
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="../base")
    monkeypatch.chdir(tmp_path)
    assert main(["chat", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    assert main(["export", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / 'merged'}"]) == 0
    edit_json(adapter / "adapter_config.json", base_model_name_or_path="models/org/base")
    capsys.readouterr()
    assert main(["chat", str(adapter), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "records its base model as 'models/org/base'" in err and "--adapter" in err and "hf download" not in err
    assert main(["export", f"adapter_name_or_path={adapter}", f"export_dir={tmp_path / 'm2'}"]) == 2
    assert "model_name_or_path" in capsys.readouterr().err


# -- one greedy text on every path -----------------------------------------------------------------

ADAPTERS = {"none": None, "lora": "qv8", "ptuning": "ptune4", "prompt_tuning": "prompt5", "prefix_tuning": "prefix3"}


def incremental_text(tokenizer, prompt: list[int], ids: list[int]) -> str:
    """What the server's incremental detokenizer makes of `ids`, token by token."""
    from posttrain.inference.detokenize import TextTracker

    tracker = TextTracker(tokenizer, prompt)
    for token in ids:
        tracker.add(token)
    tracker.flush()
    return tracker.text


@torch.no_grad()
def no_cache_greedy(model, prompt: list[int], n: int, stop: int) -> list[int]:
    """Argmax of the full-sequence forward, one token at a time: no KV cache anywhere."""
    seq, out = list(prompt), []
    for _ in range(n):
        token = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        if token == stop:
            break
        seq.append(token)
        out.append(token)
    return out


@pytest.mark.parametrize("kind", list(ADAPTERS))
def test_chat_the_server_engine_and_a_no_cache_forward_give_the_same_greedy_text(kind, lively_model_dir, adapter_root,
                                                                                  capsys):
    from peft import PeftModel

    from posttrain.data.chat import ChatRenderer
    from posttrain.data.schema import Conversation, Message
    from posttrain.inference.engine import Engine
    from posttrain.inference.registry import AdapterRegistry
    from posttrain.inference.sampling import SamplingParams
    from posttrain.model.loading import load_model, load_tokenizer

    n, question = 12, "reverse 12345"
    folder = adapter_root / ADAPTERS[kind] if ADAPTERS[kind] else None
    capsys.readouterr()
    assert main(["chat", str(lively_model_dir), "--prompt", question, "--max-new-tokens", str(n)]
                + (["--adapter", str(folder)] if folder else [])) == 0
    chat_text = capsys.readouterr().out[:-1]  # print's newline

    tok = load_tokenizer(str(lively_model_dir))
    prompt = ChatRenderer(tok).prompt_ids(Conversation([Message("user", question), Message("assistant", "")]))
    base = load_model(str(lively_model_dir), device=CPU).eval()
    engine = Engine(base, tok, fuse_weights=True)  # as `posttrain serve` builds it
    engine.registry = AdapterRegistry(engine.dims, base.config, tok, engine.weights.dtype, CPU)
    adapter = engine.registry.add("a", folder, trusted=True) if folder else None
    served = engine.generate([prompt], SamplingParams(max_new_tokens=n), [adapter])[0]

    reference = PeftModel.from_pretrained(base, str(folder)).eval() if folder else base
    ids = no_cache_greedy(reference, prompt, n, tok.eos_token_id)
    assert served.token_ids[:len(ids)] == ids
    assert chat_text == served.text == incremental_text(tok, prompt, ids)


@pytest.mark.parametrize("kind", ["ptuning", "prompt_tuning", "prefix_tuning"])
def test_evaluation_of_a_prompt_adapter_in_training_follows_its_live_weights(kind, lively_model_dir):
    """A prompt-learning model being trained (held-out evaluation, RL rollouts) generates on the engine from
    its prompt encoder's current output, exactly as its full forward would."""
    from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

    from posttrain.generation.texts import generate
    from posttrain.model.loading import load_model, load_tokenizer

    config = {"ptuning": PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=32, task_type="CAUSAL_LM"),
              "prompt_tuning": PromptTuningConfig(num_virtual_tokens=5, task_type="CAUSAL_LM"),
              "prefix_tuning": PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
                                                  task_type="CAUSAL_LM")}[kind]
    tok = load_tokenizer(str(lively_model_dir))
    model = get_peft_model(load_model(str(lively_model_dir), device=CPU), config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    prompt = tok("sort 3 1 2")["input_ids"]
    text = generate(model.eval(), tok, [prompt], max_new_tokens=10)[0]
    assert text == incremental_text(tok, prompt, no_cache_greedy(model, prompt, 10, tok.eos_token_id))


# -- a small context ---------------------------------------------------------------------------------

@pytest.fixture
def short_context_model(tiny_model_dir, tmp_path) -> Path:
    folder = shutil.copytree(tiny_model_dir, tmp_path / "short")
    edit_json(folder / "config.json", max_position_embeddings=48)
    return folder


def test_chat_answers_within_a_small_context_and_names_its_own_option(short_context_model, capsys):
    assert main(["chat", str(short_context_model), "--prompt", "hello"]) == 0, capsys.readouterr().err
    assert main(["chat", str(short_context_model), "--prompt", "hello", "--max-new-tokens", "1000"]) == 0
    capsys.readouterr()
    assert main(["chat", str(short_context_model), "--prompt", "hello", "--max-new-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-new-tokens" in err and "max_tokens" not in err


def metaspace_tokenizer():
    """A sentencepiece-style vocabulary ('▁' marks a word's leading space; decoding drops the first one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from posttrain.data.synthetic import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "</s>"], show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<unk>")


def test_whole_and_streamed_answers_agree_on_a_leading_space(lively_model_dir):
    """With a sentencepiece vocabulary the first generated word owes its space to the prompt: the answer sent
    whole (server, chat, evaluation, rollouts) is the text the streamed deltas add up to, space included."""
    from posttrain.inference.engine import Engine, Request
    from posttrain.generation.texts import generate
    from posttrain.inference.sampling import SamplingParams
    from posttrain.model.loading import load_model

    tok = metaspace_tokenizer()
    model = load_model(str(lively_model_dir), device=CPU).eval()
    engine = Engine(model, tok)
    prompts = [tok(t)["input_ids"] for t in ("hello there", "reverse 1 2 3", "sort the list", "what is", "a b c d",
                                              "the answer is", "count to five", "say yes")]
    requests = [Request(p, SamplingParams(max_new_tokens=6, ignore_eos=True), stream=s) for p in prompts
                for s in (False, True)]
    texts = {r.request_id: "" for r in requests}
    for r in requests:
        engine.add(r)
    while engine.has_work():
        for out in engine.step():
            texts[out.request_id] += out.text
    whole = [texts[r.request_id] for r in requests[0::2]]
    assert whole == [texts[r.request_id] for r in requests[1::2]]
    assert any(t.startswith(" ") for t in whole)  # the case that differs from decoding the ids alone
    assert generate(model, tok, prompts, max_new_tokens=6, stop_ids=[tok.pad_token_id]) == whole


def test_compare_on_a_base_too_short_for_its_task_says_so_before_training(tiny_model_dir, tmp_path, capsys):
    short = shutil.copytree(tiny_model_dir, tmp_path / "short")
    edit_json(short / "config.json", max_position_embeddings=24)
    out = tmp_path / "cmp"
    assert main(["compare", "--base", str(short), "--output-dir", str(out), "--steps", "1", "--methods", "full"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: --base") and "context is 24 tokens" in err
    assert not (out / "full").exists()
