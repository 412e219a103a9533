"""The one schema every input format is normalized to.

SFT and continued pre-training use `Conversation` (a conversation with only `text` set is a
pre-training document); reward models and the DPO family use `Preference`; KTO uses `Unpaired`.
RL adds `Prompt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Message:
    role: str  # one of ROLES
    content: str
    tool_calls: list[dict[str, Any]] | None = None  # assistant only, OpenAI shape
    name: str | None = None  # tool name on a tool message, when given
    tool_call_id: str | None = None  # tool message: which call it answers (some templates print it)
    reasoning: str | None = None  # assistant only: its reasoning, for templates that render it (Qwen3's <think>)
    trained: bool = True  # assistant only: False keeps this turn out of the loss (LLaMA-Factory's loss_weight 0)

    def to_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (OpenAI shape; reasoning as `reasoning_content`)."""
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.reasoning:
            d["reasoning_content"] = self.reasoning
        if self.tool_calls:
            d["tool_calls"] = self.tool_calls
        if self.name is not None:
            d["name"] = self.name
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        return d


@dataclass
class Conversation:
    """A chat (messages) or, for continued pre-training, a plain document (text)."""

    messages: list[Message] = field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    text: str | None = None  # set only for plain-text (pre-training) rows
    source: str = ""  # "file:line" of the row it came from, for error messages

    @property
    def is_text(self) -> bool:
        return self.text is not None


@dataclass
class Preference:
    """One prompt with a preferred and a dispreferred response (reward models, DPO family)."""

    prompt: list[Message]  # the conversation so far; ends with a user (or tool) message
    chosen: Message  # the preferred assistant response
    rejected: Message  # the dispreferred assistant response
    margin: float | None = None  # how much better chosen is (optional; the RM loss uses it)
    tools: list[dict[str, Any]] | None = None
    source: str = ""  # "file:line"


@dataclass
class Unpaired:
    """One prompt with one response and a thumbs-up / thumbs-down label (KTO)."""

    prompt: list[Message]
    completion: Message  # an assistant response
    label: bool  # True: desirable, False: undesirable
    tools: list[dict[str, Any]] | None = None
    source: str = ""


# ---- back from their fields (how rows travel to tokenizing worker processes, as JSON) -----------------

def conversation_from_dict(d: dict[str, Any]) -> Conversation:
    return Conversation(**{**d, "messages": [Message(**m) for m in d["messages"]]})


def preference_from_dict(d: dict[str, Any]) -> Preference:
    return Preference(**{**d, "prompt": [Message(**m) for m in d["prompt"]], "chosen": Message(**d["chosen"]),
                         "rejected": Message(**d["rejected"])})


def unpaired_from_dict(d: dict[str, Any]) -> Unpaired:
    return Unpaired(**{**d, "prompt": [Message(**m) for m in d["prompt"]], "completion": Message(**d["completion"])})
