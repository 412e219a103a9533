"""`posttrain chat`: talk to a trained folder, one-shot (--prompt) or interactively.

Answers come from the engine `posttrain serve` runs (generation/texts.py), for a plain model and
every adapter type it serves, so chat shows the text the server would send.
"""

from __future__ import annotations

from posttrain.data.chat import ChatRenderer
from posttrain.data.schema import Conversation, Message
from posttrain.data.templates import chat_stop_ids, check_template_encodes
from posttrain.errors import ConfigError
from posttrain.generation.texts import generate
from posttrain.model.loading import load_for_inference


def run_chat(model_path: str, prompt: str | None = None, system: str | None = None, template: str | None = None,
             max_new_tokens: int | None = None, temperature: float = 0.0, trust_remote_code: bool = False,
             adapter: str | None = None) -> None:
    """`max_new_tokens` None: answers may fill the model's context; a larger value is capped to it."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    model, tokenizer = load_for_inference(model_path, adapter, trust_remote_code=trust_remote_code)
    renderer = ChatRenderer(tokenizer, template)  # default: the folder's own (a stage saves the one it trained with)
    check_template_encodes(tokenizer, renderer.template, template)
    stop_ids = chat_stop_ids(tokenizer, renderer.template)  # EOS and the template's end of turn
    history = [Message("system", system)] if system else []

    def reply(text: str) -> str:
        history.append(Message("user", text))
        conv = Conversation(messages=history + [Message("assistant", "")])
        answer = generate(model, tokenizer, [renderer.prompt_ids(conv)], max_new_tokens=max_new_tokens,
                          temperature=temperature, stop_ids=stop_ids)[0]
        history.append(Message("assistant", answer))
        return answer

    if prompt is not None:
        print(reply(prompt))
        return
    print("chat with", model_path, "(empty line or Ctrl-D to quit, /reset to clear history)")
    while True:
        try:
            text = input("> ")
        except EOFError:
            break
        if not text.strip():
            break
        if text.strip() == "/reset":
            del history[1 if system else 0:]
            continue
        print(reply(text))
