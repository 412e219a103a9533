"""`posttrain data preview`: one row as a stage will train on it, trained tokens marked.

sft      the conversation, every trained span marked
rm, dpo  the prompt once, then the chosen and the rejected response, each with its trained span
kto      the prompt and the response with its label
ppo/grpo the prompt exactly as generation will see it (nothing is trained on prompts)

The stage comes from the config's own `stage:` key (or `--stage`), so a DPO config previews pairs.
"""

from __future__ import annotations

from posttrain.data.chat import ChatRenderer, preview
from posttrain.data.formats import DatasetSpec, dataset_specs, load_conversations
from posttrain.data.pairs import response_renderer
from posttrain.data.preference_formats import load_kto_records, load_preferences, unpair_preferences
from posttrain.data.prompts import load_prompts
from posttrain.data.schema import Conversation
from posttrain.errors import DataError

STAGES = ("sft", "rm", "dpo", "kto", "ppo", "grpo")


def _mark(renderer: ChatRenderer, conv: Conversation, color: bool) -> tuple[str, str]:
    sample = renderer.tokenize(conv)
    return f"{len(sample.input_ids)} tokens, {sample.num_trained} trained", preview(renderer, conv, color=color)


def sft_samples(config, tokenizer, count: int, color: bool = False) -> list[dict]:
    """The first `count` rows of an SFT config's data: {"source", "tokens", "trained", "text"} with the
    trained spans marked (`posttrain data preview`, and the board's samples tab)."""
    renderer = ChatRenderer(tokenizer, config.template, config.train_on_prompt, config.mask_history,
                            config.mask_reasoning)
    convs = load_conversations(dataset_specs(config), config.on_bad_rows, config.seed, max_samples=count)[0]
    out = []
    for conv in convs[:count]:
        sample = renderer.tokenize(conv)
        out.append({"source": conv.source, "tokens": len(sample.input_ids), "trained": sample.num_trained,
                    "text": preview(renderer, conv, color=color)})
    return out


def _nth(rows: list, index: int, specs: list[DatasetSpec], what: str):
    if index >= len(rows):
        raise DataError(f"--index {index}: the data has only {len(rows)} usable {what} (--index counts from 0)",
                        ", ".join(s.path for s in specs))
    return rows[index]


def preview_row(stage: str, config, tokenizer, index: int, color: bool) -> str:
    """The text `posttrain data preview` prints for row `index` of the config's training data."""
    specs = dataset_specs(config)
    marked = "highlighted" if color else "inside [[ ]]"
    if stage == "sft":
        row = _nth(sft_samples(config, tokenizer, index + 1, color), index, specs, "rows")
        return f"--- {row['source']}: {row['tokens']} tokens, {row['trained']} trained ({marked}) ---\n{row['text']}"
    if stage in ("ppo", "grpo"):
        prompt = _nth(load_prompts(specs, config.on_bad_rows, config.seed, max_samples=index + 1)[0], index, specs,
                      "prompts")
        renderer = ChatRenderer(tokenizer, config.template)
        conv = Conversation(messages=prompt.messages, tools=prompt.tools, source=prompt.source)
        ids = renderer.generation_prompt_ids(conv)
        return (f"--- {prompt.source}: prompt of {len(ids)} tokens, as generation sees it (nothing trained) ---\n"
                + tokenizer.decode(ids))
    renderer = response_renderer(tokenizer, config.template, config.mask_reasoning)
    if stage in ("rm", "dpo"):
        pair = _nth(load_preferences(specs, config.on_bad_rows, config.seed, max_samples=index + 1)[0], index, specs,
                    "pairs")
        out = [f"--- {pair.source}: a preference pair, each response's trained tokens {marked} ---"]
        for name, response in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            conv = Conversation(messages=[*pair.prompt, response], tools=pair.tools, source=pair.source)
            counts, text = _mark(renderer, conv, color)
            out.append(f"--- {name}: {counts} ---\n{text}")
        return "\n".join(out)
    records = load_kto_records(specs, config.on_bad_rows, config.seed, max_samples=index + 1)[0]
    row = _nth(unpair_preferences(records), index, specs, "rows")
    label = "desirable (label: true)" if row.label else "undesirable (label: false)"
    conv = Conversation(messages=[*row.prompt, row.completion], tools=row.tools, source=row.source)
    counts, text = _mark(renderer, conv, color)
    return f"--- {row.source}: {label}, {counts} ({marked}) ---\n{text}"
