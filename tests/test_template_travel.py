"""The chat template a run trains with travels with its output (chat, serve, score, export and the next
stage use it untold), a template the tokenizer cannot encode is refused, and generation stops at the
template's end-of-turn marker, not only at EOS.

The base here is the tiny model with its tokenizer changed the way many real bases are: no chat template
and an EOS (`</s>`) that is not ChatML's end of turn (`<|im_end|>`, still a special token of the vocab).
"""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from inference_fixtures import one_torch_thread  # noqa: F401  (autouse: tiny models run single-threaded)
from serve_fixtures import free_port, running_server

from posttrain.cli import main
from posttrain.config import SFTConfig, build_config
from posttrain.data.chat import BUILTIN_TEMPLATES_DIR
from posttrain.data.synthetic import preference_pairs, split_task, write_jsonl
from posttrain.errors import ConfigError
from posttrain.train.sft import run_sft

CHATML = (BUILTIN_TEMPLATES_DIR / "chatml.jinja").read_text()
PROMPT = "reverse 12345"


def write_base(path: Path, tokenizer) -> Path:
    from posttrain.model.tiny import build_model

    model = build_model(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory) -> Path:
    """The tiny model whose tokenizer has no chat template and ends sequences with `</s>`."""
    from posttrain.model.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = None
    tokenizer.add_special_tokens({"eos_token": "</s>"})
    return write_base(tmp_path_factory.mktemp("models") / "plain", tokenizer)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    train, _ = split_task(400, 0, seed=1)
    return write_jsonl([{"messages": r["messages"]} for r in train], tmp_path_factory.mktemp("data") / "task.jsonl")


def sft(base, data, out, **extra):
    settings = dict(model_name_or_path=str(base), dataset=str(data), output_dir=str(out), learning_rate=3e-3,
                    per_device_train_batch_size=8, max_steps=30, logging_steps=10, save_steps=0, cutoff_len=64,
                    disable_tqdm=True, plot_loss=False, lr_scheduler_type="constant", seed=0, template="chatml")
    return run_sft(build_config(SFTConfig, {**settings, **extra})).output_dir


@pytest.fixture(scope="module")
def chatml_run(plain_base, data, tmp_path_factory) -> Path:
    """Full SFT of the plain base with `template: chatml`: it learns to end answers with <|im_end|>."""
    return sft(plain_base, data, tmp_path_factory.mktemp("runs") / "sft")


@pytest.fixture(scope="module")
def chatml_lora(plain_base, data, tmp_path_factory) -> Path:
    return sft(plain_base, data, tmp_path_factory.mktemp("runs") / "lora", finetuning_type="lora", lora_rank=16,
               lora_target="all", learning_rate=1e-2)


def chatml_answer(model_dir, adapter=None, prompt: str = PROMPT, tokens: int = 24) -> str:
    """The greedy answer up to the first <|im_end|>, from generation that ignores every stop; asserts the model
    does write <|im_end|> and more after it (else stopping there would go untested)."""
    from posttrain.inference.engine import Engine
    from posttrain.generation.engine_backend import split_prompt_learning
    from posttrain.inference.sampling import SamplingParams
    from posttrain.model.loading import load_for_inference

    model, tokenizer = load_for_inference(str(model_dir), str(adapter) if adapter else None)
    if adapter is not None:
        model = model.merge_and_unload()
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=CHATML,
                                         tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    engine = Engine(split_prompt_learning(model)[0], tokenizer, fuse_weights=False)
    out = engine.generate([ids], SamplingParams(max_new_tokens=tokens, ignore_eos=True))[0].token_ids
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end in out and out.index(end) < len(out) - 1, tokenizer.decode(out)
    assert tokenizer.eos_token_id != end
    return tokenizer.decode(out[:out.index(end)], skip_special_tokens=True)


# ---- the template travels -------------------------------------------------------------------------

def test_a_run_trained_with_a_template_saves_it_and_chat_uses_it(chatml_run, capsys):
    assert (chatml_run / "chat_template.jinja").read_text() == CHATML
    assert main(["chat", str(chatml_run), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == chatml_answer(chatml_run) + "\n"


def test_an_adapter_carries_its_template_into_chat_and_export(plain_base, chatml_lora, tmp_path, capsys):
    assert (chatml_lora / "chat_template.jinja").read_text() == CHATML
    assert main(["chat", str(chatml_lora), "--prompt", PROMPT, "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == chatml_answer(plain_base, chatml_lora) + "\n"
    out = tmp_path / "merged"
    assert main(["export", f"adapter_name_or_path={chatml_lora}", f"export_dir={out}"]) == 0
    assert (out / "chat_template.jinja").read_text() == CHATML


def test_the_next_stage_renders_with_the_saved_template(chatml_run, tmp_path):
    from posttrain.data.pairs import response_renderer
    from posttrain.model.loading import load_tokenizer

    train, _ = split_task(16, 0, seed=3)
    pairs = write_jsonl(preference_pairs(train, seed=0), tmp_path / "pairs.jsonl")
    out = tmp_path / "dpo"
    assert main(["dpo", f"model_name_or_path={chatml_run}", f"dataset={pairs}", f"output_dir={out}", "max_steps=2",
                 "per_device_train_batch_size=8", "save_steps=0", "cutoff_len=64", "disable_tqdm=true",
                 "plot_loss=false"]) == 0
    assert response_renderer(load_tokenizer(str(chatml_run)), None).template == CHATML
    assert (out / "chat_template.jinja").read_text() == CHATML


def test_score_finds_the_template_in_the_folder_when_the_recorded_file_is_gone(chatml_run, tmp_path):
    from posttrain.score import run_score
    from posttrain.train.rm import run_rm
    from posttrain.config import RMConfig

    template = tmp_path / "mine.jinja"
    template.write_text(CHATML)
    train, _ = split_task(16, 0, seed=3)
    pairs = write_jsonl(preference_pairs(train, seed=0), tmp_path / "pairs.jsonl")
    rm = run_rm(build_config(RMConfig, dict(model_name_or_path=str(chatml_run), dataset=str(pairs),
                                            output_dir=str(tmp_path / "rm"), max_steps=2, save_steps=0,
                                            per_device_train_batch_size=8, cutoff_len=64, disable_tqdm=True,
                                            plot_loss=False, template=str(template)))).output_dir
    scored = run_score(str(rm), str(pairs))["scores"]
    template.unlink()  # the recorded path no longer resolves; the folder still holds the template
    assert run_score(str(rm), str(pairs))["scores"] == scored


# ---- generation stops at the template's end of turn ------------------------------------------------

def test_chat_stops_at_the_end_of_turn_marker_not_only_at_eos(chatml_run, capsys):
    from posttrain.chat_command import run_chat

    run_chat(str(chatml_run), prompt=PROMPT, template="chatml", max_new_tokens=24)
    assert capsys.readouterr().out == chatml_answer(chatml_run) + "\n"


def test_end_of_turn_ids_come_from_the_template(tiny_tokenizer, plain_base):
    from posttrain.data.chat import resolve_template
    from posttrain.data.templates import chat_stop_ids, end_of_turn_ids
    from posttrain.model.loading import load_tokenizer

    end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tiny_tokenizer, CHATML) == [end]
    # This vocabulary has no <|eot_id|> token: the marker is several byte pieces, not a stop token.
    assert end_of_turn_ids(tiny_tokenizer, resolve_template("llama3", tiny_tokenizer)) == []
    plain = load_tokenizer(str(plain_base))
    assert chat_stop_ids(plain, CHATML) == [plain.convert_tokens_to_ids("</s>"), end]


def test_rollouts_stop_at_the_end_of_turn_marker(chatml_run):
    from posttrain.data.templates import end_of_turn_ids
    from posttrain.model.loading import load_model, load_tokenizer
    from posttrain.train.rl.rollout import RolloutSampler

    tokenizer = load_tokenizer(str(chatml_run))
    model = load_model(str(chatml_run), device=torch.device("cpu"))
    end = end_of_turn_ids(tokenizer, CHATML)
    sampler = RolloutSampler(model, tokenizer, max_batch_size=1, seed=0, end_of_turn=end)
    prompt = tokenizer(tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                                     add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    [rollout] = sampler.sample([prompt], max_new_tokens=24, temperature=0)
    assert rollout.stopped and rollout.response_ids[-1] == end[0] and end[0] not in rollout.response_ids[:-1]
    assert rollout.text == chatml_answer(chatml_run)


# ---- serve ------------------------------------------------------------------------------------------

@contextmanager
def serving(**settings):
    import openai

    from posttrain.config import ServeConfig

    with running_server(ServeConfig(port=free_port(), served_model_name="base", **settings)) as (_, url):
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def ask(client, model: str):
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPT}],
                                           max_tokens=24, temperature=0)
    return reply.choices[0]


def test_serve_answers_chats_for_a_run_trained_with_a_template(chatml_run):
    with serving(model=str(chatml_run)) as client:
        choice = ask(client, "base")
    assert choice.message.content == chatml_answer(chatml_run) and choice.finish_reason == "stop"


def test_serve_template_flag_for_the_base_and_adapters_without_their_own(plain_base, chatml_lora, tmp_path):
    import openai

    bare = tmp_path / "bare"  # an adapter folder with no tokenizer and no template of its own
    shutil.copytree(chatml_lora, bare, ignore=shutil.ignore_patterns("tokenizer*", "chat_template.jinja"))
    adapters = {"own": str(chatml_lora), "bare": str(bare)}
    with serving(model=str(plain_base), adapters=adapters) as client:
        with pytest.raises(openai.BadRequestError, match="no chat template"):
            ask(client, "base")
        own = ask(client, "own")  # the adapter's own template, though the base has none
    assert own.message.content == chatml_answer(plain_base, chatml_lora) and own.finish_reason == "stop"
    with serving(model=str(plain_base), adapters=adapters, template="chatml") as client:
        assert ask(client, "base").finish_reason in ("stop", "length")
        assert ask(client, "bare").message.content == own.message.content


# ---- a template the tokenizer cannot encode ---------------------------------------------------------

@pytest.fixture(scope="module")
def no_underscore_base(tmp_path_factory) -> Path:
    """A character-level vocabulary with an unknown token, holding no `_` and no newline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = "abcdefghijklmnopqrstuvwxyz0123456789<|> "
    vocab = {"<unk>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    raw = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    raw.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>", pad_token="</s>")
    return write_base(tmp_path_factory.mktemp("models") / "chars", tokenizer)


def test_a_template_the_tokenizer_cannot_encode_is_refused_before_training(no_underscore_base, data, tmp_path,
                                                                            capsys):
    out = tmp_path / "run"
    assert main(["sft", f"model_name_or_path={no_underscore_base}", f"dataset={data}", f"output_dir={out}",
                 "template=chatml", "max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: template 'chatml' renders text this tokenizer cannot encode: '_', '\\n'")
    assert "<|im_start|>" in err and "Traceback" not in err
    assert not out.exists()


def test_serve_and_chat_refuse_a_template_the_tokenizer_cannot_encode(no_underscore_base):
    from posttrain.chat_command import run_chat
    from posttrain.serve.server import build_state
    from posttrain.config import ServeConfig

    with pytest.raises(ConfigError, match="template 'chatml' renders text this tokenizer cannot encode"):
        build_state(ServeConfig(model=str(no_underscore_base), template="chatml"))
    with pytest.raises(ConfigError, match="template 'chatml' renders text this tokenizer cannot encode"):
        run_chat(str(no_underscore_base), prompt="hi", template="chatml")


# ---- compare on your own data and template -----------------------------------------------------------

def test_compare_trains_on_given_data_and_template(plain_base, tmp_path):
    from posttrain.compare import run_compare

    rows, _ = split_task(40, 0, seed=5)
    data = write_jsonl([{"instruction": r["messages"][0]["content"], "output": r["answer"]} for r in rows],
                       tmp_path / "alpaca.jsonl")
    root = tmp_path / "cmp"
    results = run_compare(str(root), methods=["full"], steps=2, batch_size=8, base=str(plain_base),
                          data=str(data), template="chatml", quiet=True)
    assert 0 <= results["full"]["accuracy"] <= 1
    held = [json.loads(line) for line in (root / "data" / "held_out.jsonl").read_text().splitlines()]
    trained = [json.loads(line) for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    assert len(held) == 4 and len(trained) == 36
    asked = {r["messages"][0]["content"] for r in rows}
    assert {h["messages"][0]["content"] for h in held} <= asked and all(h["answer"] for h in held)
    assert not {h["messages"][0]["content"] for h in held} & {t["messages"][0]["content"] for t in trained}
    assert (root / "full" / "chat_template.jinja").read_text() == CHATML


def test_compare_cli_takes_data_and_template(tmp_path, capsys):
    text = write_jsonl([{"text": "some words"}] * 4, tmp_path / "text.jsonl")
    assert main(["compare", "--data", str(text), "--template", "chatml", "--output-dir", str(tmp_path / "c"),
                 "--steps", "1"]) == 2
    assert "every row must be a conversation ending in an assistant turn" in capsys.readouterr().err


def test_serve_cli_takes_a_template(plain_base, capsys):
    assert main(["serve", str(plain_base), "--template", "no-such-template"]) == 2
    assert "error: template: 'no-such-template' is neither a built-in template" in capsys.readouterr().err
