"""A stage's training and eval data, read from its config's data keys and made into samples.

Rows come through a format's loader (bad rows skipped or refused by `on_bad_rows`, each named by
file:line); eval rows from `eval_dataset`, or held out of the training rows by `val_size`. Then
every row is rendered, tokenized and cut to cutoff_len, in `preprocessing_num_workers` processes
or read back from the tokenized cache (cache.py). Every check on the data runs here, before the
stage loads a model.

`main` says this process is the first one: it logs the data summaries and writes cache entries.
"""

from __future__ import annotations

import logging

from posttrain.data.cache import TokenizeOptions, tokenize_rows
from posttrain.data.chat import ChatRenderer
from posttrain.data.formats import dataset_specs, load_conversations
from posttrain.data.pairs import PAIRS, UNPAIRED, PairSample, UnpairedSample, response_renderer, unpaired_items
from posttrain.data.preference_formats import load_kto_records, load_preferences, unpair_preferences
from posttrain.data.prepare import SFT, Kind, PrepareReport, split_eval
from posttrain.data.schema import Preference
from posttrain.data.templates import check_template_encodes
from posttrain.errors import DataError

log = logging.getLogger(__name__)


def load_rows(config, loader):
    """Training and eval rows through `loader` (conversations, pairs, prompts...), bad rows reported."""
    rows, report = loader(dataset_specs(config, "dataset"), config.on_bad_rows, config.seed, config.max_samples)
    if report.bad_rows:
        log.warning("skipped %d bad rows; first reasons:\n  %s", report.bad_rows, "\n  ".join(report.bad_reasons))
    evals = []
    if config.eval_dataset:
        evals = loader(dataset_specs(config, "eval_dataset"), config.on_bad_rows, config.seed)[0]
    elif config.val_size:
        rows, evals = split_eval(rows, config.val_size, config.seed)
    return rows, evals


def load_sft_samples(config, tokenizer, main: bool = True) -> tuple[list, list, PrepareReport]:
    """Training and eval `TokenizedSample`s of conversations (or `text` rows, which use no template),
    with the training data's report; the turns trained as the config's masking keys say."""
    renderer = ChatRenderer(tokenizer, config.template, config.train_on_prompt, config.mask_history,
                            config.mask_reasoning)
    convs, eval_convs = load_rows(config, load_conversations)
    if not all(c.is_text for c in convs + eval_convs):
        check_template_encodes(tokenizer, renderer.template, config.template)
    return _tokenize_split(config, SFT, renderer, convs, eval_convs, main)


def _tokenize_split(config, kind: Kind, renderer, rows: list, eval_rows: list, main: bool):
    """Training and eval items of `kind`, cut to cutoff_len (in `preprocessing_num_workers` processes or read
    back from the tokenized cache), with the training data's report."""
    options = TokenizeOptions.from_config(config, main=main)
    train, report = tokenize_rows(kind, rows, renderer, config.cutoff_len, config.overlong, options)
    evals = (tokenize_rows(kind, eval_rows, renderer, config.cutoff_len, config.overlong, options)[0]
             if eval_rows else [])
    return train, evals, report


def _tokenize_responses(config, tokenizer, kind: Kind, rows: list, eval_rows: list, main: bool):
    """Training and eval items of `kind` (pairs or KTO rows; the response trained), with the training report."""
    renderer = response_renderer(tokenizer, config.template, config.mask_reasoning)
    check_template_encodes(tokenizer, renderer.template, config.template)
    return _tokenize_split(config, kind, renderer, rows, eval_rows, main)


def load_pair_samples(config, tokenizer, main: bool = True) -> tuple[list[PairSample], list[PairSample]]:
    """Training and eval `PairSample`s (preference data: rm and the DPO family)."""
    train, evals, report = _tokenize_responses(config, tokenizer, PAIRS, *load_rows(config, load_preferences), main)
    if main:
        log.info("data: %s", report.summary().replace("samples", "pairs", 1))
    return train, evals


def load_unpaired_samples(config, tokenizer, main: bool = True) -> tuple[list[UnpairedSample], list[UnpairedSample]]:
    """Training and eval `UnpairedSample`s (KTO data); preference pairs among them are unpaired. The
    training data must hold both desirable and undesirable rows."""
    records, eval_records = load_rows(config, load_kto_records)
    pairs, eval_pairs = (sum(isinstance(r, Preference) for r in rs) for rs in (records, eval_records))
    if (pairs or eval_pairs) and main:
        log.info("data: %d training and %d eval preference pairs (chosen/rejected, no label) unpaired for KTO: each "
                 "chosen response is a desirable row and each rejected one an undesirable row (TRL's "
                 "unpair_preference_dataset)", pairs, eval_pairs)
    train, evals, report = _tokenize_responses(config, tokenizer, UNPAIRED, unpaired_items(unpair_preferences(records)),
                                               unpaired_items(unpair_preferences(eval_records)), main)
    labels = [s.label for s in train]
    missing = [name for name, n in (("desirable (label: true)", sum(labels)),
                                    ("undesirable (label: false)", len(labels) - sum(labels))) if n == 0]
    if missing:
        raise DataError(f"KTO weighs desirable against undesirable responses, but the training data has no "
                        f"{' and no '.join(missing)} rows; add some, or train on preference pairs with "
                        "`posttrain dpo`", ", ".join(e.path for e in config.dataset_entries()))
    if main:
        log.info("data: %s; %d desirable, %d undesirable", report.summary().replace("samples", "rows", 1),
                 sum(labels), len(labels) - sum(labels))
    return train, evals
