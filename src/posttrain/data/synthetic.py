"""The embedded tasks used by the quickstart, the tests and the benchmarks.

Every task is deterministic given a seed, needs no download, and has one exact answer per prompt,
so "did training work" is an exact-match accuracy, not a judgement call.
"""

from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

# Digits: the default tokenizer gives every digit its own token, so these tasks are about the
# transformation, not about undoing BPE merges.
SYMBOLS = string.digits


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(SYMBOLS) for _ in range(rng.randint(lo, hi)))


def _reverse(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"reverse {w}", w[::-1]


def _sort(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"sort {w}", "".join(sorted(w))


def _shift(rng: random.Random) -> tuple[str, str]:
    w = _word(rng, 3, 7)
    return f"shift {w}", "".join(str((int(c) + 1) % 10) for c in w)


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"{a}+{b}", str(a + b)


TASKS = {"reverse": _reverse, "shift": _shift, "sort": _sort, "add": _add}
DEFAULT_TASKS = ("reverse",)  # learnable from scratch in a couple of CPU minutes


def task_examples(n: int, seed: int, tasks=DEFAULT_TASKS) -> list[dict]:
    """`n` rows in OpenAI `messages` format, each with its exact `answer` for evaluation."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt, answer = TASKS[rng.choice(tasks)](rng)
        rows.append({
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            "answer": answer,
        })
    return rows


def split_task(n_train: int, n_eval: int, seed: int = 0, tasks=DEFAULT_TASKS) -> tuple[list[dict], list[dict]]:
    """Train and held-out rows with no prompt in common."""
    rows = task_examples(n_train + n_eval * 2, seed, tasks)
    train, seen = rows[:n_train], {r["messages"][0]["content"] for r in rows[:n_train]}
    held_out = [r for r in rows[n_train:] if r["messages"][0]["content"] not in seen][:n_eval]
    return train, held_out


_WORDS = ("the model reads tokens and learns to answer questions about data files while the loss "
          "falls steadily across every step of training on small machines").split()


def chat_corpus(n: int, seed: int, min_words: int = 5, max_words: int = 700) -> list[dict]:
    """Mixed-length multi-turn conversations (tens to ~1k tokens) for benchmarks."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        turns = rng.randint(1, 3)
        budget = int(math.exp(rng.uniform(math.log(min_words), math.log(max_words))))
        messages = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": "You are a helpful assistant."})
        for _ in range(turns):
            q = max(2, budget // (3 * turns))
            a = max(2, budget // turns - q)
            messages.append({"role": "user", "content": " ".join(rng.choice(_WORDS) for _ in range(q)) + "?"})
            messages.append({"role": "assistant", "content": " ".join(rng.choice(_WORDS) for _ in range(a)) + "."})
        rows.append({"messages": messages})
    return rows


def tokenizer_corpus() -> list[str]:
    """Text the default tokenizer is trained on: the tasks, chat scaffolding, plain words."""
    texts = [r["messages"][0]["content"] + " " + r["answer"] for r in task_examples(2000, 1234, tuple(TASKS))]
    texts += [" ".join(_WORDS)] * 20
    texts += ["system user assistant tool You are a helpful assistant."] * 50
    texts += [string.ascii_letters + string.digits + string.punctuation] * 5
    return texts


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def wrong_answer(answer: str, rng: random.Random, same_length: bool = False) -> str:
    """A near miss of `answer`: one digit changed, two neighbours swapped, one dropped or added, or
    the reversal undone — the mistakes a half-trained model makes, never the answer itself.
    `same_length`: no digit dropped or added, so that only the digits tell it from the answer."""
    kinds = ("change", "swap", "unreverse") if same_length else ("change", "swap", "drop", "add", "unreverse")
    for _ in range(100):
        i = rng.randrange(len(answer))
        kind = rng.choice(kinds)
        if kind == "change":
            wrong = answer[:i] + rng.choice(SYMBOLS.replace(answer[i], "")) + answer[i + 1:]
        elif kind == "swap" and len(answer) > 1:
            i = min(i, len(answer) - 2)
            wrong = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
        elif kind == "drop" and len(answer) > 1:
            wrong = answer[:i] + answer[i + 1:]
        elif kind == "add":
            wrong = answer[:i] + rng.choice(SYMBOLS) + answer[i:]
        else:
            wrong = answer[::-1]
        if wrong != answer:
            return wrong
    raise ValueError(f"no wrong answer found for {answer!r}")


def preference_pairs(rows: list[dict], seed: int) -> list[dict]:
    """{prompt, chosen, rejected} rows from task rows: the exact answer against a near miss."""
    rng = random.Random(seed)
    return [{"prompt": r["messages"][0]["content"], "chosen": r["answer"], "rejected": wrong_answer(r["answer"], rng)}
            for r in rows]
