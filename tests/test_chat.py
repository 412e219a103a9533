"""Trained-token masks for any chat template, and the options that change them."""

from __future__ import annotations

import pytest
from template_fixtures import trained_runs

from posttrain.data.chat import IGNORE_INDEX, ChatRenderer, preview
from posttrain.data.schema import Conversation, Message
from posttrain.errors import ConfigError

# A Llama-3-style template written here, different from the built-in ones (no tools, a BOS text).
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def conv(*turns, system=None):
    msgs = [Message("system", system)] if system else []
    roles = ["user", "assistant"]
    msgs += [Message(roles[i % 2], t) for i, t in enumerate(turns)]
    return Conversation(msgs, source="t:1")


def trained_text(renderer, sample) -> list[str]:
    return trained_runs(renderer.tokenizer, sample)


@pytest.fixture
def llama3_template(tmp_path):
    path = tmp_path / "llama3_style.jinja"
    path.write_text(LLAMA3_STYLE)
    return str(path)


def test_chatml_masks_each_assistant_turn_with_its_end_token(tiny_tokenizer):
    r = ChatRenderer(tiny_tokenizer)
    c = conv("reverse 123", "321", "sort 312", "123", system="Be brief.")
    s = r.tokenize(c)
    assert trained_text(r, s) == ["321<|im_end|>", "123<|im_end|>"]
    assert len(s.input_ids) == len(s.labels)
    # Tokenized piece by piece it still decodes to the full render.
    assert tiny_tokenizer.decode(s.input_ids) == r.render(c)


def test_llama3_style_template_from_a_file(tiny_tokenizer, llama3_template):
    r = ChatRenderer(tiny_tokenizer, template=llama3_template)
    s = r.tokenize(conv("hi", "hello there", "again", "ok"))
    assert trained_text(r, s) == ["hello there<|eot_id|>", "ok<|eot_id|>"]
    assert tiny_tokenizer.decode(s.input_ids).startswith("<|begin_of_text|><|start_header_id|>user")


def test_builtin_llama3_and_tool_calls(tiny_tokenizer):
    c = Conversation([
        Message("user", "weather in Paris?"),
        Message("assistant", "", tool_calls=[{"type": "function", "function": {"name": "w", "arguments": {"city": "Paris"}}}]),
        Message("tool", '{"t": 20}'),
        Message("assistant", "20C"),
    ])
    for name, eot in (("llama3", "<|eot_id|>"), ("chatml", "<|im_end|>")):
        r = ChatRenderer(tiny_tokenizer, template=name)
        runs = trained_text(r, r.tokenize(c))
        assert len(runs) == 2 and "Paris" in runs[0] and runs[1] == "20C" + eot
        assert not any("20}" in x for x in runs)  # the tool result is never trained


def test_train_on_prompt_and_mask_history(tiny_tokenizer):
    c = conv("a", "b", "c", "d")
    full = ChatRenderer(tiny_tokenizer, train_on_prompt=True).tokenize(c)
    assert all(l != IGNORE_INDEX for l in full.labels)
    r = ChatRenderer(tiny_tokenizer, mask_history=True)
    assert trained_text(r, r.tokenize(c)) == ["d<|im_end|>"]


def test_template_that_rewrites_history_trains_every_turn_as_rendered(tiny_tokenizer):
    # Like templates that drop earlier reasoning: the last assistant turn renders differently. Every
    # turn is trained as it appears in the whole rendering, not only the last one.
    tpl = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
           "<a>{{ m['content'] | upper }}</a>{% elif m['role'] == 'assistant' %}<a>{{ m['content'] }}</a>"
           "{% else %}<u>{{ m['content'] }}</u>{% endif %}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}")
    r = ChatRenderer(tiny_tokenizer, template=None)
    r.template = tpl
    assert trained_text(r, r.tokenize(conv("x", "yy", "z", "ww"))) == ["YY</a>", "ww</a>"]


def test_text_rows_are_fully_trained(tiny_tokenizer):
    r = ChatRenderer(tiny_tokenizer)
    s = r.tokenize(Conversation(text="plain document"))
    assert all(l != IGNORE_INDEX for l in s.labels)
    assert tiny_tokenizer.decode(s.input_ids) == "plain document" + tiny_tokenizer.eos_token


def test_unknown_template_and_prompt_ids(tiny_tokenizer):
    with pytest.raises(ConfigError, match="neither a built-in template"):
        ChatRenderer(tiny_tokenizer, template="nope")
    r = ChatRenderer(tiny_tokenizer)
    ids = r.prompt_ids(conv("reverse 12", "21"))
    assert tiny_tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert "[[21<|im_end|>]]" in preview(r, conv("reverse 12", "21"))
