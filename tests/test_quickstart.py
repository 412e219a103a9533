"""`posttrain quickstart --fast` on two seeds: every stage moves its figure the right way, and every printed
figure lands in summary.json (what bench/efficacy.py reads over seeds). Marked `efficacy` (about 2 min a
seed on 2 CPU cores): run by `make test-efficacy`."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main

pytestmark = pytest.mark.efficacy

PAIRS = {"pair_accuracy", "own_pair_accuracy", "same_length_pair_accuracy"}
FIGURES = {"sft": {"before", "after"}, "lora": {"after"}, "rm": PAIRS, "rm_head": PAIRS,
           **{stage: {"before", "after", "original_after"} for stage in ("dpo", "ppo", "grpo")}}


@pytest.mark.parametrize("seed", [0, 1])
def test_every_stage_moves_its_figure_the_right_way(seed, tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--seed", str(seed), "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == seed and summary["fast"] is True and not list(out.glob("*.tmp"))
    for stage, keys in FIGURES.items():
        assert set(summary[stage]) == keys, stage
        assert all(0 <= v <= 1 for v in summary[stage].values()), stage
    printed = capsys.readouterr().out
    assert f"after SFT: {summary['sft']['after']:.1%}" in printed  # the file holds what was printed
    assert f"-> {summary['grpo']['after']:.1%}" in printed

    # The bars are looser than the full run's (bench/efficacy.py): --fast trains every stage less.
    assert summary["sft"]["before"] < 0.05 and summary["sft"]["after"] >= 0.95 and summary["lora"]["after"] >= 0.9
    assert summary["headroom"] <= 0.7  # SFT leaves the other wordings undone...
    assert summary["rm_head"]["own_pair_accuracy"] > 0.8  # the exact answer above the SFT model's own wrong one
    assert summary["rm"]["pair_accuracy"] >= 0.9  # PPO's reward model (DPO's implicit reward) judges digits too
    assert summary["rm"]["same_length_pair_accuracy"] >= 0.9
    for stage in ("dpo", "ppo", "grpo"):  # ...and each later stage raises them, keeping the original wording
        figures = summary[stage]
        assert figures["before"] == summary["headroom"], stage
        assert figures["after"] >= figures["before"] + 0.2, (stage, figures)
        assert figures["original_after"] >= 0.9, (stage, figures)
