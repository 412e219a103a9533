"""Real models' chat templates: the ids trained on are apply_chat_template's, every assistant turn is
trained as rendered (content, tool calls, end-of-turn), nothing else; for SFT, pairs, KTO and RL."""

from __future__ import annotations

import pytest
from template_fixtures import TEMPLATES, model_tokenizer, trained_runs

from posttrain.data.chat import IGNORE_INDEX, ChatRenderer, preview
from posttrain.data.pairs import response_renderer, tokenize_pairs, tokenize_unpaired
from posttrain.data.schema import Conversation, Message, Preference, Unpaired
from posttrain.errors import DataError

MODELS = ["qwen2_5", "qwen3", "llama3_2", "phi3", "mistral_v0_3", "gemma2"]
END_OF_TURN = {"qwen2_5": "<|im_end|>", "qwen3": "<|im_end|>", "llama3_2": "<|eot_id|>", "phi3": "<|end|>",
               "mistral_v0_3": "</s>", "gemma2": "<end_of_turn>"}
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}, "id": "call00001"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# How each template writes that call, up to its end-of-turn marker (the trained text of the call turn).
CALL_TEXT = {
    "qwen2_5": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
    "llama3_2": '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
    "mistral_v0_3": '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "call00001"}]</s>',
}




def reference_ids(tokenizer, conv: Conversation, **kw) -> list[int]:
    return tokenizer.apply_chat_template([m.to_dict() for m in conv.messages], tools=conv.tools, tokenize=True,
                                         return_dict=False, **kw)


def chat(model: str, *turns: str, system: bool = True) -> Conversation:
    msgs = [Message("system", "Be brief.")] if system and model != "gemma2" else []  # Gemma-2 has no system role
    msgs += [Message(("user", "assistant")[i % 2], t) for i, t in enumerate(turns)]
    return Conversation(msgs, source="demo.jsonl:3")


def tool_chat(model: str) -> Conversation:
    return Conversation([Message("system", "Be brief."), Message("user", "Weather in Paris?"),
                         Message("assistant", "", tool_calls=[CALL]),
                         Message("tool", '{"temperature": 20}', tool_call_id="call00001"),
                         Message("assistant", "It is 20 degrees.")], tools=TOOLS, source="glaive.jsonl:7")


@pytest.mark.parametrize("model", MODELS)
def test_every_turn_is_trained_and_ids_are_apply_chat_templates(model):
    tok = model_tokenizer(model)
    r = ChatRenderer(tok)
    conv = chat(model, "Reverse abc", "cba", "Sort 312", "123")
    sample = r.tokenize(conv)
    # One BOS, no extra prefix space: exactly what inference tokenizes.
    assert sample.input_ids == reference_ids(tok, conv)
    eot = END_OF_TURN[model]
    # Qwen3's empty <think> block on the last turn, Phi-3's trailing <|endoftext|>, the headers and the
    # newlines after the markers are the template's; Mistral's system prompt (which its template drops
    # from whole conversations) is not trained either.
    assert trained_runs(tok, sample) == [f"cba{eot}", f"123{eot}"]


@pytest.mark.parametrize("model", ["qwen2_5", "qwen3", "llama3_2", "mistral_v0_3"])
def test_tool_call_turns_are_trained_as_the_template_writes_them(model):
    tok = model_tokenizer(model)
    conv = tool_chat(model)
    sample = ChatRenderer(tok).tokenize(conv)
    assert sample.input_ids == reference_ids(tok, conv)
    assert trained_runs(tok, sample) == [CALL_TEXT[model], f"It is 20 degrees.{END_OF_TURN[model]}"]


def test_sentencepiece_prompt_and_response_ids_are_one_tokenization():
    # The prefix-space trap: "123" tokenized on its own starts with "▁", inside the conversation it does not.
    tok = model_tokenizer("phi3")
    assert tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"])[0].startswith("▁")
    sample = ChatRenderer(tok).tokenize(chat("phi3", "Sort 312", "123"))
    assert not any(t.startswith("▁") for t in tok.convert_ids_to_tokens(
        [i for i, lab in zip(sample.input_ids, sample.labels) if lab != IGNORE_INDEX]))


def test_bos_written_by_the_template_is_not_added_again():
    tok = model_tokenizer("llama3_2")
    bos = tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert tok("x")["input_ids"][0] == bos  # the encoder adds one too
    r = ChatRenderer(tok)
    conv = chat("llama3_2", "hi", "hello")
    assert r.tokenize(conv).input_ids.count(bos) == 1
    assert r.prompt_ids(conv).count(bos) == 1


def test_qwen3_reasoning_the_data_holds_is_trained_unless_masked():
    tok = model_tokenizer("qwen3")
    conv = chat("qwen3", "Sort 312", "123")
    conv.messages[-1].reasoning = "Three digits, ascending."
    sample = ChatRenderer(tok).tokenize(conv)
    assert sample.input_ids == reference_ids(tok, conv)
    assert trained_runs(tok, sample) == ["<think>\nThree digits, ascending.\n</think>\n\n123<|im_end|>"]
    masked = ChatRenderer(tok, mask_reasoning=True).tokenize(conv)
    assert trained_runs(tok, masked) == ["123<|im_end|>"]


@pytest.mark.parametrize("model", ["qwen3", "qwen2_5"])
def test_reasoning_written_inline_is_trained_unless_masked(model):
    tok = model_tokenizer(model)
    conv = chat(model, "Sort 312", "<think>\nThree digits, ascending.\n</think>\n\n123")
    sample = ChatRenderer(tok).tokenize(conv)
    assert sample.input_ids == reference_ids(tok, conv)
    assert trained_runs(tok, sample) == ["<think>\nThree digits, ascending.\n</think>\n\n123<|im_end|>"]
    assert trained_runs(tok, ChatRenderer(tok, mask_reasoning=True).tokenize(conv)) == ["123<|im_end|>"]


def test_a_response_starting_where_the_prompt_ends_keeps_the_prompt_ids():
    # "\n" + "\n..." would merge into one token if tokenized together; generation never merges into its prompt.
    tok = model_tokenizer("qwen2_5")
    prompt = chat("qwen2_5", "Sort 312").messages
    sample = response_renderer(tok, None).response_sample(prompt, Message("assistant", "\n\n123"), None)
    generation_prompt = reference_ids(tok, Conversation(prompt), add_generation_prompt=True)
    assert sample.input_ids[:len(generation_prompt)] == generation_prompt
    assert tok.decode(sample.input_ids) == tok.decode(generation_prompt) + "\n\n123<|im_end|>"
    assert "".join(trained_runs(tok, sample)) == "\n\n123<|im_end|>"


def test_mask_history_and_train_on_prompt_still_apply():
    tok = model_tokenizer("qwen3")
    conv = chat("qwen3", "Reverse abc", "cba", "Sort 312", "123")
    assert trained_runs(tok, ChatRenderer(tok, mask_history=True).tokenize(conv)) == ["123<|im_end|>"]
    everything = ChatRenderer(tok, train_on_prompt=True).tokenize(conv)
    assert all(lab != IGNORE_INDEX for lab in everything.labels)


def test_loss_weight_zero_leaves_a_turn_out():
    tok = model_tokenizer("qwen2_5")
    conv = chat("qwen2_5", "Reverse abc", "cba", "Sort 312", "123")
    conv.messages[2].trained = False
    assert trained_runs(tok, ChatRenderer(tok).tokenize(conv)) == ["123<|im_end|>"]


@pytest.mark.parametrize("turns", [("Sort 312",), ("Reverse abc", "cba", "Sort 312")], ids=["one-turn", "multi-turn"])
@pytest.mark.parametrize("model", MODELS)
def test_pairs_and_kto_rows_continue_the_generation_prompt(model, turns):
    tok = model_tokenizer(model)
    r = response_renderer(tok, None)
    prompt = chat(model, *turns).messages
    pair = Preference(prompt, Message("assistant", "123"), Message("assistant", "321"), source="p.jsonl:1")
    (sample,), _ = tokenize_pairs([pair], r, cutoff_len=512)
    generation_prompt = reference_ids(tok, Conversation(prompt), add_generation_prompt=True)
    eot = END_OF_TURN[model]
    for seq, answer in ((sample.chosen, "123"), (sample.rejected, "321")):
        # The prompt is what generation sees (Mistral: with its system prompt); the response follows it.
        assert seq.input_ids[:len(generation_prompt)] == generation_prompt
        assert trained_runs(tok, seq) == [f"{answer}{eot}"]
        assert all(lab == IGNORE_INDEX for lab in seq.labels[:len(generation_prompt)])
    rows = [Unpaired(prompt, Message("assistant", "123"), True, source="k.jsonl:1"),
            Unpaired(prompt, Message("assistant", "321"), False, source="k.jsonl:2")]
    kto, _ = tokenize_unpaired(rows, r, cutoff_len=512)
    assert trained_runs(tok, kto[0].sample) == [f"123{eot}"] and trained_runs(tok, kto[0].mismatched) == [f"321{eot}"]


def test_pair_response_ids_are_the_whole_conversations_where_the_prompt_is_a_prefix():
    tok = model_tokenizer("phi3")
    prompt = chat("phi3", "Sort 312").messages
    sample = response_renderer(tok, None).response_sample(prompt, Message("assistant", "123"), None)
    whole = reference_ids(tok, Conversation([*prompt, Message("assistant", "123")]))
    # Up to the end-of-turn marker: what inference produces (Phi-3's trailing newline and <|endoftext|> are not).
    assert whole[:len(sample.input_ids)] == sample.input_ids
    assert tok.decode(sample.input_ids).endswith("123<|end|>")


@pytest.mark.parametrize("model", MODELS)
def test_rl_prompts_are_the_generation_prompt(model):
    from posttrain.data.prompts import Prompt
    from posttrain.train.rl.recipe import tokenize_prompts

    tok = model_tokenizer(model)
    messages = chat(model, "Sort 312").messages
    [(ids, _)] = tokenize_prompts([Prompt(messages, "Sort 312", source="rl.jsonl:1")], tok, None, cutoff_len=512)
    assert ids == reference_ids(tok, Conversation(messages), add_generation_prompt=True)


@pytest.mark.parametrize("model", ["qwen2_5", "phi3"])
def test_mask_matches_transformers_generation_tags(model, caplog):
    # The same template with {% generation %} around each answer + end-of-turn marker: transformers'
    # own assistant mask must be ours.
    source = (TEMPLATES / f"{model}.jinja").read_text()
    if model == "qwen2_5":
        plain = "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
        tagged = ("{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' }}{% generation %}"
                  "{{- message.content + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}{%- else %}"
                  + plain + "{%- endif %}")
    else:
        plain = "{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}"
        tagged = ("{{'<|assistant|>\\n'}}{% generation %}{{message['content'] + '<|end|>'}}{% endgeneration %}"
                  "{{'\\n'}}")
    assert plain in source
    tok = model_tokenizer(model)
    tok.chat_template = source.replace(plain, tagged)
    conv = chat(model, "Reverse abc", "cba", "Sort 312", "123")
    with caplog.at_level("WARNING", logger="posttrain.data.chat"):
        ours = ChatRenderer(tok).tokenize(conv)
    assert "generation" not in caplog.text  # the renderer's own check agrees
    theirs = tok.apply_chat_template([m.to_dict() for m in conv.messages], tokenize=True, return_dict=True,
                                     return_assistant_tokens_mask=True)
    assert ours.input_ids == theirs["input_ids"]
    assert [lab != IGNORE_INDEX for lab in ours.labels] == [bool(m) for m in theirs["assistant_masks"]]


def test_generation_tags_that_disagree_with_our_turns_are_reported(caplog):
    tok = model_tokenizer("qwen2_5")
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' %}"
                         "{% generation %}{{ m.content }}<|im_end|>\n{% endgeneration %}{% else %}{{ m.content }}"
                         "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
                         "{% endif %}")
    r = ChatRenderer(tok)
    with caplog.at_level("WARNING", logger="posttrain.data.chat"):
        sample = r.tokenize(chat("qwen2_5", "Sort 312", "123"))
    assert trained_runs(tok, sample) == ["123<|im_end|>"]  # the newline after the marker is not ours to train
    assert "demo.jsonl:3: the chat template's {% generation %} tags mark" in caplog.text


def test_gemma_system_role_is_a_one_line_error_naming_the_row():
    tok = model_tokenizer("gemma2")
    conv = Conversation([Message("system", "Be brief."), Message("user", "hi"), Message("assistant", "hello")],
                        source="demo.jsonl:4")
    with pytest.raises(DataError, match=r"^demo\.jsonl:4: chat template failed to render this row: System role not"):
        ChatRenderer(tok).tokenize(conv)
    with pytest.raises(DataError, match="System role not supported"):
        preview(ChatRenderer(tok), conv)


def test_a_template_that_renders_an_answer_twice_is_refused():
    tok = model_tokenizer("qwen2_5")
    r = ChatRenderer(tok)
    r.template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "summary: {{ messages[-1].content }}")
    with pytest.raises(DataError, match=r"demo\.jsonl:3: the chat template renders the content of message 2 more "
                                        "than once"):
        r.tokenize(chat("qwen2_5", "Sort 312", "123", system=False))


def test_preview_marks_exactly_the_trained_text():
    tok = model_tokenizer("qwen3")
    text = preview(ChatRenderer(tok), chat("qwen3", "Reverse abc", "cba", "Sort 312", "123"))
    assert "assistant\n[[cba<|im_end|>]]\n" in text
    assert "assistant\n<think>\n\n</think>\n\n[[123<|im_end|>]]\n" in text


def test_data_preview_of_a_row_the_template_refuses_is_one_error_line(tmp_path, capsys):
    import json

    from posttrain.cli import main

    model = tmp_path / "gemma"
    model_tokenizer("gemma2").save_pretrained(model)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    assert main(["data", "preview", f"model_name_or_path={model}", f"dataset={data}"]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {data}:1: ") and "System role not supported" in err, err
    assert "Traceback" not in err


def test_a_turn_without_the_end_of_turn_marker_is_refused_not_run_into_the_next_message():
    # Llama-3.1 ends a built-in tool call with <|eom_id|>: the next <|eot_id|> is the user's, not this turn's.
    tok = model_tokenizer("llama3_2")
    r = ChatRenderer(tok)
    r.template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
                  "{{ m.content }}{% if m.tool_calls %}<|eom_id|>{% else %}<|eot_id|>{% endif %}{% endfor %}"
                  "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    conv = chat("llama3_2", "Weather?", "Calling get_weather.", "Thanks", "Bye", system=False)
    conv.messages[1].tool_calls = [CALL]
    with pytest.raises(DataError, match=r"demo\.jsonl:3: cannot find the end-of-turn marker '<\|eot_id\|>' after "
                                        "assistant message 2"):
        r.tokenize(conv)


@pytest.mark.parametrize("model", ["qwen2_5", "qwen3"])
def test_llamafactory_glaive_tool_call_row_trains_the_call_and_the_answer(model):
    import json

    from posttrain.data.formats import to_conversation

    row = {"conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})},
        {"from": "observation", "value": json.dumps({"temperature": 20})},
        {"from": "gpt", "value": "It is 20 degrees."}],
        "tools": json.dumps([TOOLS[0]["function"]])}
    conv = to_conversation(row, "auto", "glaive_toolcall_en_demo.json", 1)
    tok = model_tokenizer(model)
    sample = ChatRenderer(tok).tokenize(conv)
    assert sample.input_ids == reference_ids(tok, conv)
    assert trained_runs(tok, sample) == [CALL_TEXT[model], "It is 20 degrees.<|im_end|>"]


def test_end_of_turn_is_found_for_a_template_that_needs_a_system_message():
    tok = model_tokenizer("qwen2_5")
    r = ChatRenderer(tok)
    r.template = ("{% if messages[0].role != 'system' %}{{ raise_exception('a system message comes first') }}"
                  "{% endif %}"
                  "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    assert trained_runs(tok, r.tokenize(chat("qwen2_5", "Sort 312", "123"))) == ["123<|im_end|>"]
