"""Shared fixtures: one tiny model written once per session, and the embedded task as data."""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "POSTTRAIN_CACHE" not in os.environ:  # tokenized data and reference log-probs: never the user's cache
    os.environ["POSTTRAIN_CACHE"] = tempfile.mkdtemp(prefix="posttrain-test-cache-")
    atexit.register(shutil.rmtree, os.environ["POSTTRAIN_CACHE"], True)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from posttrain.model.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from posttrain.model.loading import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


@pytest.fixture(scope="session")
def task_data(tmp_path_factory) -> Path:
    from posttrain.data.synthetic import split_task, write_jsonl

    train, _ = split_task(400, 0, seed=1)
    return write_jsonl([{"messages": r["messages"]} for r in train], tmp_path_factory.mktemp("data") / "task.jsonl")


def sft_overrides(model_dir, data, out, **extra) -> list[str]:
    """A small, fast SFT run as CLI overrides."""
    base = dict(model_name_or_path=model_dir, dataset=data, output_dir=out, learning_rate=3e-3,
                per_device_train_batch_size=8, max_steps=30, logging_steps=5, save_steps=0, cutoff_len=64,
                disable_tqdm=True, lr_scheduler_type="constant", seed=0)
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]
