"""Parameter-efficient SFT: every finetuning_type trains, saves in PEFT's format, and loads back
unchanged through plain PEFT + transformers; LoRA merges; bad settings fail before training."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from posttrain.cli import main
from posttrain.config import ExportConfig, SFTConfig, build_config
from posttrain.errors import ConfigError
from posttrain.export import run_export
from posttrain.model.loading import load_for_inference
from posttrain.model.tiny import write_tiny_model
from posttrain.train.sft import run_sft

from conftest import sft_overrides


def _config(model_dir, data, out, **extra) -> SFTConfig:
    raw = dict(o.split("=", 1) for o in sft_overrides(model_dir, data, out, **extra))
    import yaml

    return build_config(SFTConfig, {k: yaml.safe_load(v) for k, v in raw.items()})


def _probe(vocab: int = 300) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab, (2, 12), generator=g)


def _logits(model, ids) -> torch.Tensor:
    ids = ids.to(next(model.parameters()).device)  # trained and loaded models sit on CUDA where there is one
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float().cpu()


def _plain(model_dir):
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


METHODS = {
    "lora": dict(finetuning_type="lora", lora_rank=4),
    "dora_rslora": dict(finetuning_type="lora", lora_rank=4, use_dora=True, use_rslora=True, lora_target="q_proj,v_proj"),
    "loraplus_modules_to_save": dict(finetuning_type="lora", loraplus_lr_ratio=16, modules_to_save="norm"),
    "ptuning": dict(finetuning_type="ptuning", num_virtual_tokens=4, encoder_hidden_size=32),
    "ptuning_lstm": dict(finetuning_type="ptuning", num_virtual_tokens=4, encoder_reparameterization_type="LSTM"),
    "prompt_tuning": dict(finetuning_type="prompt_tuning", num_virtual_tokens=4, prompt_tuning_init_text="reverse"),
    "prefix_tuning": dict(finetuning_type="prefix_tuning", num_virtual_tokens=4),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_adapter_trains_and_reloads_identically_through_plain_peft(name, tiny_model_dir, task_data, tmp_path):
    out = tmp_path / name
    result = run_sft(_config(tiny_model_dir, task_data, out, max_steps=12, logging_steps=4, **METHODS[name]))
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files  # an adapter, not a copy of the base

    records = result.metrics
    summary = records[0]
    assert summary["step"] == 0 and 0 < summary["trainable_params"] < summary["total_params"]
    assert 0 < summary["trainable_percent"] < 100
    assert records[-1]["output_weights_bytes"] == (out / "adapter_model.safetensors").stat().st_size

    ids = _probe()
    trained = result.objective.model.eval()
    reloaded = PeftModel.from_pretrained(_plain(tiny_model_dir), str(out)).eval()
    base = _logits(_plain(tiny_model_dir), ids)
    a, b = _logits(trained, ids), _logits(reloaded, ids)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert (a[:, -ids.shape[1]:] - base).abs().max() > 1e-3  # the adapter does something


def test_lora_learns_the_task(tiny_model_dir, task_data, tmp_path):
    # The final norm rides along (modules_to_save): a random base's frozen norm and small tied
    # embeddings cap its logit scale, which low-rank updates alone cannot lift.
    result = run_sft(_config(tiny_model_dir, task_data, tmp_path / "lora", max_steps=100, logging_steps=10,
                             per_device_train_batch_size=32, finetuning_type="lora", lora_rank=16,
                             modules_to_save="norm", learning_rate=5e-3))
    losses = [r["loss"] for r in result.metrics if "loss" in r]
    assert losses[-1] < 0.8 * losses[0]


def test_freeze_trains_only_the_chosen_layers(tiny_model_dir, task_data, tmp_path):
    out = tmp_path / "freeze"
    run_sft(_config(tiny_model_dir, task_data, out, max_steps=5, finetuning_type="freeze",
                    freeze_trainable_layers=1, freeze_trainable_modules="mlp"))
    from safetensors.torch import load_file

    before, after = load_file(tiny_model_dir / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.layers.3.mlp.") for k in changed)


def test_pissa_adapter_is_converted_for_the_original_base(tiny_model_dir, task_data, tmp_path):
    out = tmp_path / "pissa"
    result = run_sft(_config(tiny_model_dir, task_data, out, max_steps=6, finetuning_type="lora", lora_rank=4,
                             pissa_init=True, pissa_iter=-1))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True  # rank doubled by the conversion
    ids = _probe()
    reloaded = PeftModel.from_pretrained(_plain(tiny_model_dir), str(out)).eval()
    torch.testing.assert_close(_logits(result.objective.model.eval(), ids), _logits(reloaded, ids), rtol=0, atol=1e-4)


def test_export_merges_lora_and_refuses_prompt_adapters(tiny_model_dir, task_data, tmp_path):
    lora = tmp_path / "lora"
    run_sft(_config(tiny_model_dir, task_data, lora, max_steps=8, finetuning_type="lora"))
    merged = tmp_path / "merged"
    # The base comes from the adapter's own record when not given.
    assert main(["export", f"adapter_name_or_path={lora}", f"export_dir={merged}"]) == 0
    assert (merged / "config.json").is_file() and (merged / "tokenizer.json").is_file()
    ids = _probe()
    adapter_model, _ = load_for_inference(str(lora))
    torch.testing.assert_close(_logits(_plain(merged), ids), _logits(adapter_model, ids), rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="already holds a posttrain export"):
        run_export(ExportConfig(adapter_name_or_path=str(lora), export_dir=str(merged)))

    pt = tmp_path / "pt"
    run_sft(_config(tiny_model_dir, task_data, pt, max_steps=2, finetuning_type="prompt_tuning", num_virtual_tokens=2))
    with pytest.raises(ConfigError, match="cannot be merged"):
        run_export(ExportConfig(adapter_name_or_path=str(pt), export_dir=str(tmp_path / "m2")))
    assert not (tmp_path / "m2").exists()


def test_resume_lora_from_checkpoint_matches_uninterrupted(tiny_model_dir, task_data, tmp_path):
    settings = dict(max_steps=12, save_steps=6, finetuning_type="lora", lora_rank=4, lr_scheduler_type="cosine")
    straight = run_sft(_config(tiny_model_dir, task_data, tmp_path / "a", **settings))
    # Checkpoints of an adapter run hold the adapter's parameters only, not the frozen base.
    ckpt = tmp_path / "a" / "checkpoint-6"
    from safetensors.torch import load_file

    assert all("lora_" in k for k in load_file(ckpt / "model.safetensors"))
    resumed = run_sft(_config(tiny_model_dir, task_data, tmp_path / "b", resume_from_checkpoint=str(ckpt), **settings))
    a = load_file(tmp_path / "a" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter_model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert straight.train_loss == pytest.approx(resumed.train_loss)


@pytest.mark.parametrize("extra, message", [
    (dict(finetuning_type="lora", lora_target="query_key_value"), r"name no module of this model; its linear layers are"),
    (dict(finetuning_type="lora", lora_rank=0), r"'lora_rank'.*greater than 0"),
    (dict(finetuning_type="qlora"), r"needs a CUDA GPU|needs the bitsandbytes package"),  # no GPU | GPU, no bnb
    (dict(finetuning_type="prefix_tuning", packing=True), r"packing: true cannot be used"),
    (dict(finetuning_type="freeze", freeze_trainable_layers=9), r"out of range for a model with 4 layers"),
    (dict(finetuning_type="lora", modules_to_save="value_head"), r"modules_to_save.*name no module"),
    (dict(finetuning_type="full", adapter_name_or_path="x"), r"adapter_name_or_path is set but finetuning_type"),
])
def test_bad_finetuning_settings_fail_before_training(extra, message, tiny_model_dir, task_data, tmp_path):
    out = tmp_path / "bad"
    with pytest.raises(ConfigError, match=message):
        run_sft(_config(tiny_model_dir, task_data, out, max_steps=2, **extra))
    assert not (out / "metrics.jsonl").exists()


def test_adapter_for_another_base_is_refused(tiny_model_dir, task_data, tmp_path):
    lora = tmp_path / "lora"
    run_sft(_config(tiny_model_dir, task_data, lora, max_steps=1, finetuning_type="lora"))
    other = write_tiny_model(tmp_path / "small", size="small")
    with pytest.raises(ConfigError, match="does not fit this base model"):
        load_for_inference(str(other), str(lora))
    with pytest.raises(ConfigError, match="is a PEFT adapter, not a full model"):
        run_sft(_config(lora, task_data, tmp_path / "x", max_steps=1))


def test_compare_prints_one_measured_table(tmp_path, capsys):
    from posttrain.compare import run_compare

    results = run_compare(str(tmp_path / "cmp"), methods=["full", "lora", "ptuning"], steps=3, batch_size=8,
                          train_rows=64, held_out_rows=16)
    table = capsys.readouterr().out
    assert set(results) == {"full", "lora", "ptuning"}
    full, lora, pt = results["full"], results["lora"], results["ptuning"]
    assert full["trainable_percent"] == 100 and 0 < lora["trainable_params"] < full["trainable_params"]
    assert 0 < pt["trainable_params"] < full["trainable_params"]
    assert lora["output_bytes"] < full["output_bytes"] and pt["output_bytes"] < full["output_bytes"]
    assert all(r["peak_rss_mib"] > 0 and 0 <= r["accuracy"] <= 1 for r in results.values())
    for header in ("params updated", "peak RSS", "held-out exact match", "output size"):
        assert header in table
    assert (tmp_path / "cmp" / "compare.md").read_text().count("\n") == 5
