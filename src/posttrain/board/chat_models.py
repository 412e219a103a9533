"""The board's chat panel: a run's model answers through the same path as `posttrain chat` (the
inference engine `posttrain serve` runs), the last few models kept loaded."""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from posttrain.errors import ConfigError, PosttrainError

ROLES = ("system", "user", "assistant")


class ChatModels:
    def __init__(self, runs, capacity: int = 2):
        self.runs, self.capacity = runs, capacity
        self.loaded: OrderedDict[tuple[str, bool], tuple] = OrderedDict()
        self.lock = threading.Lock()  # one generation at a time: the models share the machine

    def _load(self, folder: Path, base: bool):
        from posttrain.data.chat import ChatRenderer
        from posttrain.model.loading import load_for_inference

        config = self.runs.config(folder)
        if base:
            if not config.get("model_name_or_path"):
                raise ConfigError(f"{folder}: no posttrain_config.yaml names the run's base model")
            path = config["model_name_or_path"]
        elif (folder / "config.json").is_file() or (folder / "adapter_config.json").is_file():
            path = str(folder)
        else:
            raise ConfigError(f"{folder}: no final model yet (the run has not finished); chat with it once it has")
        model, tokenizer = load_for_inference(path, trust_remote_code=bool(config.get("trust_remote_code")))
        return model, tokenizer, ChatRenderer(tokenizer, config.get("template"))

    def model(self, folder: Path, base: bool):
        key = (str(folder), base)
        if key in self.loaded:
            self.loaded.move_to_end(key)
            return self.loaded[key]
        entry = self._load(folder, base)
        self.loaded[key] = entry
        while len(self.loaded) > self.capacity:
            self.loaded.popitem(last=False)
        return entry

    def reply(self, folder: Path, base: bool, messages: list[dict], max_new_tokens: int) -> str:
        from fastapi import HTTPException

        from posttrain.data.schema import Conversation, Message
        from posttrain.generation.texts import generate

        if not messages or any(m.get("role") not in ROLES or not isinstance(m.get("content"), str) for m in messages):
            raise HTTPException(400, f"messages: a list of {{role, content}} with role one of {', '.join(ROLES)}")
        try:
            with self.lock:
                model, tokenizer, renderer = self.model(folder, base)
                conv = Conversation(messages=[Message(m["role"], m["content"]) for m in messages]
                                    + [Message("assistant", "")])
                return generate(model, tokenizer, [renderer.prompt_ids(conv)], max_new_tokens=max_new_tokens)[0]
        except PosttrainError as err:
            raise HTTPException(400, str(err)) from None
