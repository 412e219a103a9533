"""`posttrain quickstart --fast --seed N`: every stage runs through its command's code and every printed
figure lands in summary.json (what bench/efficacy.py reads over seeds)."""

from __future__ import annotations

import json

from posttrain.cli import main


def test_quickstart_writes_every_figure_to_summary_json(tmp_path, capsys):
    out = tmp_path / "qs"
    assert main(["quickstart", "--fast", "--seed", "3", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 3 and summary["fast"] is True
    figures = {"sft": {"before", "after"}, "lora": {"after"}, "rm": {"pair_accuracy"},
               **{stage: {"before", "after", "original_after"} for stage in ("dpo", "ppo", "grpo")}}
    for stage, keys in figures.items():
        assert set(summary[stage]) == keys, stage
        assert all(0 <= v <= 1 for v in summary[stage].values()), stage
    assert 0 <= summary["headroom"] <= 1
    printed = capsys.readouterr().out
    assert f"after SFT: {summary['sft']['after']:.1%}" in printed  # the file holds what was printed
    assert f"-> {summary['grpo']['after']:.1%}" in printed
    assert not list(out.glob("*.tmp"))
