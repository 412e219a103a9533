"""`posttrain score MODEL DATA`: score responses with a trained reward model (a `posttrain rm` folder, or a
`posttrain dpo` folder by its implicit reward: train/reward_scoring.py).

DATA holds prompt/response rows in any SFT format (prompt + completion, messages, sharegpt,
alpaca, ...): the last assistant message is the response that is scored. A preference file
(chosen + rejected) is scored pair by pair and the pair accuracy reported. Responses are rendered
and tokenized exactly as `posttrain rm` trained on them (its chat template and cutoff_len, read from
the folder's posttrain_config.yaml unless `--template` / `--cutoff-len` say otherwise; a recorded
template file that is gone is found in the folder's tokenizer, where rm saved it), and cut by the
same rule (the first tokens are kept: data/prepare.py `truncate`); a warning says how many rows were cut, and
names any row left out because its response lies wholly past the cut. With `--output`, one JSON
line per row: {"source": "file:line", "reward": r, "normalized": (r - mean) / std}.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from posttrain.data.formats import DatasetSpec, load_conversations
from posttrain.data.pairs import response_renderer, tokenize_pairs, tokenize_response
from posttrain.data.prepare import CutoffCounter, PrepareReport
from posttrain.data.preference_formats import load_preferences
from posttrain.data.sources import RawRow, read_rows
from posttrain.data.templates import check_template_encodes
from posttrain.errors import DataError
from posttrain.model.loading import pick_device
from posttrain.model.reward import check_is_reward_model
from posttrain.train.reward_scoring import RewardScorer

log = logging.getLogger(__name__)


def _is_preference_file(path: str) -> bool:
    first = next((r for r in read_rows(path) if isinstance(r, RawRow)), None)
    return first is not None and {"chosen", "rejected"} <= set(first.data)


def _warn_cut(report: PrepareReport, cutoff_len: int, left_out: list[str]) -> None:
    if report.truncated:
        log.warning("%d rows were longer than --cutoff-len %d and cut to their first %d tokens, as `posttrain rm` "
                    "cuts its training rows: their reward is read at the cut, not at the end of the response; raise "
                    "--cutoff-len to score them whole", report.truncated, cutoff_len, cutoff_len)
    if left_out:
        log.warning("%d rows left out of the scores: their prompt fills --cutoff-len %d, so no response token is "
                    "left to score (as `posttrain rm` drops them from training): %s%s", len(left_out), cutoff_len,
                    ", ".join(left_out[:5]), " ..." if len(left_out) > 5 else "")


def run_score(model_path: str, data: str, output: str | None = None, *, template: str | None = None,
              batch_size: int = 16, cutoff_len: int | None = None, trust_remote_code: bool = False) -> dict:
    check_is_reward_model(model_path)
    scorer = RewardScorer(model_path, pick_device("auto"), trust_remote_code)
    cutoff_len = cutoff_len or scorer.cutoff_len or 4096
    tokenizer, stats = scorer.tokenizer, scorer.stats
    renderer = response_renderer(tokenizer, template or scorer.template)
    check_template_encodes(tokenizer, renderer.template, template)
    if _is_preference_file(data):
        pairs, _ = load_preferences([DatasetSpec(path=data)])
        samples, report = tokenize_pairs(pairs, renderer, cutoff_len)
        read = [p.source for p in pairs]
        sources = [s.source for s in samples]
        sequences = [s.chosen for s in samples] + [s.rejected for s in samples]
    else:
        convs, _ = load_conversations([DatasetSpec(path=data)])
        if any(c.is_text for c in convs):
            raise DataError("text rows have no response to score; give prompt/response rows", data)
        cutoff = CutoffCounter(cutoff_len, "truncate")
        kept = [(c.source, cutoff([tokenize_response(renderer, c.messages[:-1], c.messages[-1], c.tools, c.source)]))
                for c in convs]
        kept = [(source, seqs[0]) for source, seqs in kept if seqs is not None]
        report = cutoff.finish(kept, "rows")
        read = [c.source for c in convs]
        sources, sequences = [k[0] for k in kept], [k[1] for k in kept]
    _warn_cut(report, cutoff_len, sorted(set(read) - set(sources)))
    rewards = scorer(sequences, batch_size).tolist()
    summary = {"rows": len(sources), "scored_by": scorer.kind, "reward_mean": sum(rewards) / len(rewards)}
    rows = []
    if len(sequences) == 2 * len(sources):  # pairs: chosen then rejected
        n = len(sources)
        chosen, rejected = rewards[:n], rewards[n:]
        summary["pair_accuracy"] = sum(c > r for c, r in zip(chosen, rejected)) / n
        rows = [{"source": s, "chosen": c, "rejected": r} for s, c, r in zip(sources, chosen, rejected)]
    else:
        for s, r in zip(sources, rewards):
            row = {"source": s, "reward": r}
            if stats and stats[1] > 0:
                row["normalized"] = (r - stats[0]) / stats[1]
            rows.append(row)
    if output:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        Path(output).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary["scores"] = rows
    return summary
