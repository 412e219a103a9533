"""The shared-prompt layout (each prompt run once per batch) gives the plain per-row forward's per-token
log-probs, entropies, values AND gradients: for a causal LM, a LoRA actor (and its base with the adapter
off) and a value-head critic, with prompts of different lengths, groups out of order and ragged responses
(run in several tail passes, each padded to its own longest)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from posttrain.model.loading import load_model
from posttrain.model.reward import load_reward_model
from posttrain.train.rl.experience import collate_rollouts, response_logps, response_values, shares_prompts
from posttrain.train.rl.rollout import Rollout
from posttrain.train.rl.shared_prompt import (CPU_SHARING_BREAK_EVEN, GPU_SHARING_BREAK_EVEN, min_saved_positions,
                                              worth_sharing)

CPU = torch.device("cpu")


def _rollouts(vocab: int) -> list[Rollout]:
    """3 prompts of 2, 9 and 14 tokens, 4 completions each (1 to 7 tokens), rows interleaved."""
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in (2, 9, 14)]
    rows = [Rollout(p, [rng.randrange(3, vocab) for _ in range(rng.randint(1, 7))], "", True)
            for p in prompts for _ in range(4)]
    rng.shuffle(rows)
    return rows


def _both(model, rollouts, pad_id, run):
    """run(batch) -> (per-token outputs, scalar loss) on the plain and the shared layout: outputs, grads."""
    out = []
    for share in (False, True):
        batch = collate_rollouts(rollouts, pad_id, CPU, share_prompts=share)
        assert ("tail_ids" in batch) == share  # the shared layout was taken when asked (prompts repeat)
        assert ("chunks" in batch) == share  # ragged responses: tail passes grouped by length
        model.zero_grad(set_to_none=True)
        values, loss = run(batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        out.append((values.detach(), batch["mask"], grads))
    (a, mask_a, grads_a), (b, mask_b, grads_b) = out
    assert torch.equal(mask_a, mask_b)
    mask = mask_a.view(*mask_a.shape, *[1] * (a.dim() - 2))
    torch.testing.assert_close(a * mask, b * mask, rtol=0, atol=2e-5)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=2e-5, msg=name)


def _policy_run(model):
    def run(batch):
        logp, entropy = response_logps(model, batch, temperature=0.7, entropy=True)
        weights = torch.linspace(-1, 1, logp.numel()).view_as(logp)  # distinct per-token weights, like advantages
        return torch.stack([logp, entropy], -1), ((logp * weights + 0.1 * entropy) * batch["mask"]).sum()
    return run


@pytest.fixture(scope="module")
def vocab(tiny_tokenizer):
    return len(tiny_tokenizer)


def test_causal_lm_logps_and_grads_match(tiny_model_dir, tiny_tokenizer, vocab):
    model = load_model(str(tiny_model_dir), device=CPU).train()
    assert shares_prompts(model, with_grad=True)
    _both(model, _rollouts(vocab), tiny_tokenizer.pad_token_id, _policy_run(model))


def test_lora_actor_and_its_base_match(tiny_model_dir, tiny_tokenizer, vocab):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_model(str(tiny_model_dir), device=CPU),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False))
    assert shares_prompts(model, with_grad=True)
    rollouts = _rollouts(vocab)
    _both(model, rollouts, tiny_tokenizer.pad_token_id, _policy_run(model))
    with torch.no_grad(), model.disable_adapter():  # the reference of a LoRA actor
        plain, shared = (response_logps(model, collate_rollouts(rollouts, tiny_tokenizer.pad_token_id, CPU, s), 1.0)[0]
                         for s in (False, True))
    torch.testing.assert_close(plain, shared, rtol=0, atol=2e-5)


def test_critic_values_and_grads_match(tiny_model_dir, tiny_tokenizer, vocab):
    critic = load_reward_model(str(tiny_model_dir), device=CPU).train()
    assert shares_prompts(critic, with_grad=True, critic=True)

    def run(batch):
        values = response_values(critic, batch)
        return values, (values ** 2).sum()

    _both(critic, _rollouts(vocab), tiny_tokenizer.pad_token_id, run)


def test_plain_layout_where_sharing_cannot_run_or_gains_nothing(tiny_model_dir, tiny_tokenizer, vocab):
    pad = tiny_tokenizer.pad_token_id
    distinct = [Rollout([5 + i, 6, 7], [8, 9], "", True) for i in range(4)]  # no prompt repeats
    assert "input_ids" in collate_rollouts(distinct, pad, CPU, share_prompts=True)
    one_token = [Rollout([5], [8, 9], "", True)] * 4  # an empty cached prompt row
    assert "input_ids" in collate_rollouts(one_token, pad, CPU, share_prompts=True)
    model = load_model(str(tiny_model_dir), device=CPU, gradient_checkpointing=True)
    assert shares_prompts(model, with_grad=False) and not shares_prompts(model, with_grad=True)
    # A sliding window counts cache slots, the shared prompts' padding included: such models keep the plain layout.
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
    assert not shares_prompts(MistralForCausalLM(MistralConfig(sliding_window=16, **small)), with_grad=False)
    assert shares_prompts(MistralForCausalLM(MistralConfig(sliding_window=None, **small)), with_grad=False)
    assert shares_prompts(Qwen2ForCausalLM(Qwen2Config(**small)), with_grad=False)  # its window is off
    assert not shares_prompts(Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=16,
                                                           max_window_layers=0, **small)), with_grad=False)
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    neo = dict(vocab_size=64, hidden_size=32, num_heads=4, num_layers=2, window_size=8)
    assert not shares_prompts(GPTNeoForCausalLM(GPTNeoConfig(attention_types=[[["global", "local"], 1]], **neo)),
                              with_grad=False)
    assert shares_prompts(GPTNeoForCausalLM(GPTNeoConfig(attention_types=[[["global"], 2]], **neo)), with_grad=False)


def test_on_a_gpu_small_models_keep_the_plain_layout_and_large_prompt_savings_share(tiny_model_dir):
    """A GPU pays two decoder passes in launches: a small model shares only when the skipped prompt positions
    outweigh them (GPU_SHARING_BREAK_EVEN); a CPU pays them in op dispatch, far less (CPU_SHARING_BREAK_EVEN).
    Read from the device type alone."""
    model = load_model(str(tiny_model_dir), device=CPU)
    params, layers = sum(p.numel() for p in model.parameters()), model.config.num_hidden_layers
    cuda_min = min_saved_positions(model, torch.device("cuda"))
    assert min_saved_positions(model, CPU) == math.ceil(CPU_SHARING_BREAK_EVEN * layers / params) < cuda_min / 1000
    assert cuda_min == math.ceil(GPU_SHARING_BREAK_EVEN * layers / params) > 1000  # a tiny model: hardly ever
    group = [Rollout(list(range(3, 3 + 40)), [5, 6], "", True)] * 8  # one prompt of 40 tokens, 8 completions
    saved = 8 * 42 - (39 + 8 * 2)
    assert worth_sharing(group) and worth_sharing(group, saved) and not worth_sharing(group, saved + 1)
    assert "tail_ids" in collate_rollouts(group, 0, CPU, share_prompts=True, min_saved=saved)
    assert "input_ids" in collate_rollouts(group, 0, CPU, share_prompts=True, min_saved=cuda_min)


def test_tail_passes_group_rows_by_length_where_a_pass_saves_more_than_it_costs():
    from posttrain.train.rl.shared_prompt import tail_chunks

    lengths = [16] + [6] * 62 + [1]
    groups = tail_chunks(lengths, pass_cost=1)
    assert sorted(i for g in groups for i in g) == list(range(64))  # every row once
    assert [sorted(lengths[i] for i in g) for g in groups] == [[16], [6] * 62, [1]]  # 16 + 372 + 1 + 2 < 1024
    assert tail_chunks(lengths, pass_cost=1000) == [list(range(64))]  # a pass that costs more than it saves
    assert len(tail_chunks(list(range(1, 65)), pass_cost=0)) == 4  # at most MAX_TAIL_PASSES
    assert tail_chunks([5] * 8, pass_cost=0) == [list(range(8))]  # equal lengths: one pass
