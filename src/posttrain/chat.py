"""`posttrain chat`: talk to a trained folder, one-shot (--prompt) or interactively."""

from __future__ import annotations

from posttrain.data.chat import ChatRenderer
from posttrain.data.schema import Conversation, Message
from posttrain.inference.generate import generate
from posttrain.model.loading import load_model, load_tokenizer, pick_device


def run_chat(model_path: str, prompt: str | None = None, system: str | None = None, template: str | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, trust_remote_code: bool = False) -> None:
    tokenizer = load_tokenizer(model_path, trust_remote_code)
    renderer = ChatRenderer(tokenizer, template)
    model = load_model(model_path, device=pick_device("auto"), trust_remote_code=trust_remote_code)
    history = [Message("system", system)] if system else []

    def reply(text: str) -> str:
        history.append(Message("user", text))
        conv = Conversation(messages=history + [Message("assistant", "")])
        answer = generate(model, tokenizer, [renderer.prompt_ids(conv)], max_new_tokens=max_new_tokens,
                          temperature=temperature)[0]
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
