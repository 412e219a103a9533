"""The RL update's losses are objectives of the loop's form (rl/objectives.py): the actor and the critic
run inside the module call, so a DDP wrapper sees every trained parameter and syncs its gradients itself
(before, the actor's body and head were called directly and gradients were all-reduced by hand)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import torch
import torch.distributed as torch_dist
from torch.nn.parallel import DistributedDataParallel

from posttrain.model.loading import load_model
from posttrain.model.reward import load_reward_model
from posttrain.train.rl.advantages import AdaptiveKLController
from posttrain.train.rl.experience import collate_rollouts
from posttrain.train.rl.objectives import PolicyObjective, ValueObjective
from posttrain.train.rl.rollout import Rollout

CPU = torch.device("cpu")
CONFIG = SimpleNamespace(temperature=1.0, loss_agg_mode="token_mean", max_completion_length=6, cliprange=0.2,
                         cliprange_high=None, dual_clip=None, use_kl_loss=False, kl_estimator="k1", entropy_coef=0.01)


def _micro(vocab: int, pad_id: int, share: bool) -> dict:
    rng = random.Random(0)
    rollouts = [Rollout([rng.randrange(3, vocab) for _ in range(5)], [rng.randrange(3, vocab) for _ in range(n)], "",
                        True) for n in (2, 6, 4)]
    if share:  # two completions of each prompt: the shared-prompt layout (body run apart from the head)
        rollouts = [Rollout(r.prompt_ids, r.response_ids[:k], "", True) for r in rollouts for k in (1, 2)]
    batch = collate_rollouts(rollouts, pad_id, CPU, share_prompts=share)
    assert ("tail_ids" in batch) == share
    shape = batch["mask"].shape
    per = {"advantages": torch.linspace(-1, 1, shape.numel()).view(shape), "old_values": torch.zeros(shape),
           "returns": torch.ones(shape)}
    n = int(batch["mask"].sum())
    return {"batch": batch, "per": per, "count": n, "units": n, "tokens": n, "measure_kl": False}


def test_a_ddp_wrapper_trains_every_parameter_of_the_actor_and_the_critic(tiny_model_dir, tiny_tokenizer, tmp_path):
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        actor = load_model(str(tiny_model_dir), device=CPU).train()
        critic = load_reward_model(str(tiny_model_dir), device=CPU, pad_token_id=tiny_tokenizer.pad_token_id).train()
        objectives = [(PolicyObjective(actor, CONFIG, AdaptiveKLController(0.05, None, 100)), actor),
                      (ValueObjective(critic, 0.2), critic)]
        for objective, model in objectives:
            wrapped = DistributedDataParallel(objective)
            for share in (False, True):  # DDP refuses the next forward if one left a parameter without a gradient
                out = wrapped(_micro(len(tiny_tokenizer), tiny_tokenizer.pad_token_id, share))
                out["loss_sum"].backward()
                missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
                assert not missing, missing[:3]
                assert set(out["metrics"]) >= ({"policy_loss", "entropy"} if model is actor else {"value_loss"})
                model.zero_grad(set_to_none=True)
    finally:
        torch_dist.destroy_process_group()
