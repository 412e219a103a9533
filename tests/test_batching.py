"""Packing keeps samples apart; accumulation and sharding give the same update as one big batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.data.batching import collate, pack, plan_epoch
from posttrain.data.chat import IGNORE_INDEX, ChatRenderer
from posttrain.data.schema import Conversation, Message
from posttrain.model.loading import load_model
from posttrain.train.sft import CausalLMLoss, run_sft

from conftest import sft_overrides


def _samples(tokenizer, n=6):
    r = ChatRenderer(tokenizer)
    return [r.tokenize(Conversation([Message("user", f"reverse {'1234567'[:i + 2]}"),
                                     Message("assistant", "x" * (i + 1))])) for i in range(n)]


def _per_sample_losses(model, batch, segments):
    """Summed CE per (row, start, end) segment, from full logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits  # with a cache, transformers ignores packed positions
    ce = F.cross_entropy(logits.transpose(1, 2), batch["targets"], ignore_index=IGNORE_INDEX, reduction="none")
    return [ce[row, a:b].sum() for row, a, b in segments]


def test_packed_loss_equals_unpacked(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    samples = _samples(tiny_tokenizer)
    pad = tiny_tokenizer.pad_token_id
    alone = [_per_sample_losses(model, collate([s], pad), [(0, 0, len(s.input_ids))])[0] for s in samples]

    rows = pack(samples, max_len=64)
    assert len(rows) < len(samples)  # several samples really share a row
    batch = collate(rows, pad)
    segments, order = [], []
    for b, row in enumerate(rows):
        pos = 0
        for s in row.samples:
            segments.append((b, pos, pos + len(s.input_ids)))
            order.append(samples.index(s))
            pos += len(s.input_ids)
    packed = _per_sample_losses(model, batch, segments)
    for i, loss in zip(order, packed):
        torch.testing.assert_close(loss, alone[i], rtol=1e-5, atol=1e-5)
    # The training objective (head on trained positions only) gives the same total.
    total = CausalLMLoss(model)(batch)["loss_sum"]
    torch.testing.assert_close(total, torch.stack(alone).sum(), rtol=1e-5, atol=1e-4)


def test_padded_batch_loss_equals_single(tiny_model_dir, tiny_tokenizer):
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"))
    samples = _samples(tiny_tokenizer, 4)
    pad = tiny_tokenizer.pad_token_id
    together = CausalLMLoss(model)(collate(samples, pad))["loss_sum"]
    separate = sum(CausalLMLoss(model)(collate([s], pad))["loss_sum"] for s in samples)
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-4)


def test_plan_shards_one_global_batch():
    lengths = list(range(40, 0, -1))
    one = plan_epoch(lengths, epoch=0, seed=3, micro_batch_size=2, accumulation=2, world_size=1, rank=0,
                     group_by_length=True)
    ranks = [plan_epoch(lengths, epoch=0, seed=3, micro_batch_size=2, accumulation=1, world_size=2, rank=r,
                        group_by_length=True) for r in (0, 1)]
    assert len(one) == len(ranks[0]) == 10
    for step in range(10):
        assert sorted(sum(one[step], [])) == sorted(sum(ranks[0][step] + ranks[1][step], []))
    assert sorted(i for step in one for mb in step for i in mb) == list(range(40))


def _weights(out):
    return load_file(f"{out}/model.safetensors")


def test_accumulation_4x2_equals_batch_8(tiny_model_dir, task_data, tmp_path):
    common = dict(max_steps=3, learning_rate=1e-3)
    a, b = tmp_path / "acc", tmp_path / "big"
    run_sft(load_config("sft", None, sft_overrides(tiny_model_dir, task_data, a, per_device_train_batch_size=2,
                                                   gradient_accumulation_steps=4, **common)))
    run_sft(load_config("sft", None, sft_overrides(tiny_model_dir, task_data, b, per_device_train_batch_size=8,
                                                   gradient_accumulation_steps=1, **common)))
    wa, wb = _weights(a), _weights(b)
    start = load_file(f"{tiny_model_dir}/model.safetensors")
    moved = max((wa[k] - start[k]).abs().max().item() for k in wa)
    assert moved > 1e-4  # training did change the weights
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=2e-5)


def test_metric_sums_stay_on_the_device_until_reduced(monkeypatch):
    """Adding a micro-batch's metrics never reads a tensor back (on a GPU each read is a wait);
    reducing reads them all, tensors and plain numbers alike, into the same means."""
    from posttrain.train.run_log import add_metrics, reduce_metrics

    sums: dict = {}
    batches = [{"accuracy": (torch.tensor(3.0), 4), "margin": (torch.tensor(1.5), torch.tensor(4.0))},
               {"accuracy": (1.0, 2), "margin": (torch.tensor(-0.5), torch.tensor(2.0))}]

    def no_read(*_):
        raise AssertionError("a metric tensor was read back while adding")

    with monkeypatch.context() as m:
        for name in ("item", "tolist", "__float__", "__int__", "cpu"):
            m.setattr(torch.Tensor, name, no_read)
        for metrics in batches:
            add_metrics(sums, metrics)
    assert reduce_metrics(sums, "eval_") == {"eval_accuracy": round(4 / 6, 6), "eval_margin": round(1 / 6, 6)}


def test_adamw_is_fused_where_the_kernel_applies():
    """One fused AdamW step over float parameters on one CPU/CUDA device; the per-tensor one otherwise
    (float64 has no fused kernel), with the same update either way."""
    from types import SimpleNamespace

    from posttrain.train.loop import build_optimizer

    args = SimpleNamespace(learning_rate=1e-2, adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, weight_decay=0.1,
                           loraplus_lr_ratio=None)
    updated = []
    for dtype, fused in ((torch.float32, True), (torch.float64, False)):
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3).to(dtype)
        optimizer = build_optimizer(model, args)
        assert bool(optimizer.defaults["fused"]) is fused
        model(torch.ones(2, 4, dtype=dtype)).sum().backward()
        optimizer.step()
        updated.append(model.weight.detach().float())
    assert torch.allclose(updated[0], updated[1], atol=1e-6)
