"""The RL loop. Each step, read top to bottom:

1. rollout     `rollout_batch_size` prompts x `num_generations` completions from the actor (rollout.py)
2. reward      the weighted rewards (rewards.py); optional running normalization and clipping
3. experience  old / reference log-probs and the critic's values, no gradients (experience.py)
4. advantages  KL penalty in the reward or not, then GAE or a group baseline, whitening (advantages.py)
5. update      `ppo_epochs` passes over the rollout in shuffled mini-batches, one optimizer step each
               for the actor and one for the critic (losses.py); the actor waits for `critic_warmup_steps`
6. metrics     one metrics.jsonl line per step (with alarms.py's flags), held-out greedy reward every
               `eval_steps`; a sample of the step's completions in rollouts.jsonl (completions.py)

Loss sums are divided by the units of the whole optimizer step over all micro-batches and all
ranks, as in train/loop.py. Gradients are summed over ranks by an explicit all-reduce (the actor's
forward reads its body and head directly, which DDP's hooks would not see).
"""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from posttrain.data.chat import resolve_template
from posttrain.data.prompts import Prompt
from posttrain.data.templates import end_of_turn_ids
from posttrain.errors import ConfigError
from posttrain.train import checkpoint
from posttrain.train import distributed as dist
from posttrain.train.divergence import DivergenceWatch, check_finite_weights
from posttrain.train.loop import (_add_metrics, _reduce_metrics, host_floats, autocast, build_optimizer, build_scheduler,
                                  seed_everything, trainable_state, write_final)
from posttrain.train.metrics import MetricsLogger, plot_metrics, read_metrics
from posttrain.train.rl import advantages as adv
from posttrain.train.rl.alarms import Alarms
from posttrain.train.rl.completions import CompletionLog, token_means
from posttrain.train.rl.experience import (Experience, collate_rollouts, response_logps, response_values, score_rollouts,
                                           shares_prompts)
from posttrain.train.rl.losses import loss_units, policy_loss, token_weights, value_loss
from posttrain.train.rl.rewards import Rewards, Scored
from posttrain.train.rl.rollout import Rollout, RolloutSampler
from posttrain.train.rl.shared_prompt import min_saved_positions

log = logging.getLogger(__name__)


class RunningMoments:
    """Mean and variance of every reward seen so far (merged batch by batch), for normalize_reward."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0.0

    def update(self, total: float, squares: float, n: float) -> None:
        mean, var = total / n, max(squares / n - (total / n) ** 2, 0.0)
        delta, merged = mean - self.mean, self.count + n
        self.var = (self.var * self.count + var * n + delta ** 2 * self.count * n / merged) / merged
        self.mean += delta * n / merged
        self.count = merged


class _Together:
    """The actor's and the critic's optimizers (or schedulers) saved to and restored from one state."""

    def __init__(self, parts: dict):
        self.parts = parts

    def state_dict(self) -> dict:
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])


class RLTrainer:
    def __init__(self, config, *, actor: nn.Module, critic: nn.Module | None, reference, rewards: Rewards,
                 tokenizer, prompts: list[tuple[list[int], Prompt]], eval_prompts: list[tuple[list[int], Prompt]],
                 device: torch.device, save_final: Callable[[Path], None], summary: dict | None = None):
        self.c = config
        self.actor, self.critic, self.reference = actor, critic, reference
        self.rewards, self.tokenizer, self.device = rewards, tokenizer, device
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.save_final, self.summary = save_final, summary or {}
        self.output_dir = Path(config.output_dir)
        self.world, self.rank = dist.world_size(), dist.rank()
        self.group = config.num_generations
        self.per_step = config.rollout_batch_size * self.group  # completions per step on this rank
        self.minibatch = config.per_device_train_batch_size * config.gradient_accumulation_steps
        self.minibatches = max(1, self.per_step // self.minibatch)
        # Fully on-policy (one optimizer step per rollout): the log-probs of the update's own forward ARE the
        # old ones, so the separate no-grad pass is skipped (ratio 1, the clip is inactive).
        self.need_old = not (config.ppo_epochs == 1 and self.minibatches == 1)
        # The update's forward runs each prompt of a micro-batch once where the models allow it (shared_prompt.py).
        self.share_prompts = shares_prompts(actor, with_grad=True) and (
            critic is None or shares_prompts(critic, with_grad=True, critic=True))
        # On a GPU only where the skipped prompt positions outweigh the second pass's launches (scoring and update;
        # measured with a backward, taken as is for scoring's forward-only passes).
        self.min_saved = min_saved_positions(actor, device)
        # Scoring keeps no activations for a backward, so it fits in batches as large as the update's micro-batches
        # (as TRL scores); fewer, larger forwards are much faster for small models (per-call overhead dominates).
        self.score_batch = max(config.per_device_eval_batch_size, config.per_device_train_batch_size)
        self.kl = adv.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.moments = RunningMoments()
        self.precision = lambda: autocast(device, config)
        # Completions end where the template ends an assistant turn, as SFT trained them to (not only at EOS).
        end_of_turn = end_of_turn_ids(tokenizer, resolve_template(config.template, tokenizer))
        self.sampler = RolloutSampler(actor, tokenizer, max_batch_size=max(self.per_step, 1), seed=config.seed,
                                      end_of_turn=end_of_turn)

    # -- the plan ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        mine = len(self.prompts) // self.world
        return max(1, mine // self.c.rollout_batch_size)

    def total_steps(self) -> int:
        if self.c.max_steps > 0:
            return self.c.max_steps
        return max(1, math.ceil(self.c.num_train_epochs * self.steps_per_epoch()))

    def step_prompts(self, step: int) -> list[int]:
        """This rank's prompts for `step` (indices into self.prompts): a seeded shuffle per epoch, split
        across ranks. The step's prompts over all ranks are the same for any number of processes."""
        epoch, k = divmod(step, self.steps_per_epoch())
        order = list(range(len(self.prompts)))
        random.Random(f"{self.c.seed}/{epoch}").shuffle(order)
        mine = order[self.rank::self.world]
        size = self.c.rollout_batch_size
        return [mine[(k * size + j) % len(mine)] for j in range(size)]

    def sample_seed(self, step: int, prompt: int, j: int) -> int:
        """The seed of completion j of prompt `prompt` at `step`: set by the sample itself, not by its row
        or its process, so ranks never share random streams and a run's samples do not depend on how
        many processes share the batch."""
        return random.Random(f"{self.c.seed}/{step}/{prompt}/{j}").getrandbits(63)

    # -- one step ---------------------------------------------------------------------------------
    def rollout(self, step: int, picked: list[int]) -> tuple[list[Rollout], list[Prompt]]:
        ids = [self.prompts[i][0] for i in picked for _ in range(self.group)]  # each prompt's group, consecutive
        rows = [self.prompts[i][1] for i in picked for _ in range(self.group)]
        # A prompt picked twice in one step (fewer prompts than a step asks for) gets fresh seeds each time.
        seeds, seen = [], {}
        for i in picked:
            first = seen.get(i, 0) * self.group
            seen[i] = seen.get(i, 0) + 1
            seeds += [self.sample_seed(step, i, first + j) for j in range(self.group)]
        # The engine's log-probs are of the unscaled logits: comparable with the trainer's at temperature 1 only.
        rollouts = self.sampler.sample(ids, max_new_tokens=self.c.max_completion_length,
                                       temperature=self.c.temperature, top_p=self.c.top_p, top_k=self.c.top_k,
                                       seeds=seeds, logprobs=self.c.temperature == 1.0)
        return rollouts, rows

    def shape_rewards(self, raw: torch.Tensor) -> torch.Tensor:
        rewards = raw
        if self.c.normalize_reward:  # over every rank's rewards, then this batch scaled by the running stats
            stats = dist.all_reduce_sum(torch.tensor([raw.sum().item(), (raw ** 2).sum().item(), float(raw.numel())],
                                                     dtype=torch.float64))
            self.moments.update(*stats.tolist())
            rewards = (raw - self.moments.mean) / math.sqrt(self.moments.var + 1e-8)
        if self.c.reward_clip is not None:
            rewards = rewards.clamp(-self.c.reward_clip, self.c.reward_clip)
        return rewards

    def advantages(self, exp: Experience, rewards: torch.Tensor, metrics: dict) -> None:
        c, mask = self.c, exp.mask
        kl_penalty = None
        if exp.ref_logp is not None and exp.old_logp is not None:
            kl = adv.kl_per_token(exp.old_logp, exp.ref_logp, c.kl_estimator) * mask
            metrics["kl"] = (kl.sum(), mask.sum())
            if not c.use_kl_loss:
                kl_penalty = -self.kl.value * kl
        exp.advantages, exp.returns = adv.compute_advantages(
            c.advantage_estimator, rewards.to(self.device), mask, group_size=self.group, kl_penalty=kl_penalty,
            values=exp.old_values, gamma=c.gamma, lam=c.lam)
        if c.whiten_advantages:
            a = exp.advantages
            stats = dist.all_reduce_sum(torch.stack([(a * mask).sum(), (a * a * mask).sum(), mask.sum()]).double())
            exp.advantages = adv.masked_whiten(a, mask, stats=tuple(s.float() for s in stats))

    def update(self, exp: Experience, optimizers: dict, schedulers: dict, train_actor: bool, metrics: dict) -> dict:
        c = self.c
        info = {}
        n = len(exp.rollouts)
        micro = c.per_device_train_batch_size
        rng = random.Random(f"{c.seed}/update/{self.step}")
        for _ in range(c.ppo_epochs):
            order = list(range(n))
            if self.minibatches > 1:
                rng.shuffle(order)
            size = math.ceil(n / self.minibatches)
            for start in range(0, n, size):
                rows = order[start:start + size]
                chunks = [rows[i:i + micro] for i in range(0, len(rows), micro)]
                info.update(self._minibatch(exp, chunks, optimizers, schedulers, train_actor, metrics))
        return info

    def _minibatch(self, exp: Experience, chunks: list[list[int]], optimizers, schedulers, train_actor, metrics):
        c = self.c
        pad = self.tokenizer.pad_token_id
        batches = [(idx, collate_rollouts([exp.rollouts[i] for i in idx], pad, self.device, self.share_prompts,
                                           self.min_saved), exp.rows(idx)) for idx in chunks]
        max_len = c.max_completion_length
        # Token counts from the rollouts on the host: reading the device masks would wait for the GPU.
        lengths = [[len(exp.rollouts[i].response_ids) for i in idx] for idx in chunks]
        flat = [n for chunk in lengths for n in chunk]
        units, tokens = dist.all_reduce_sum(torch.tensor([loss_units(flat, c.loss_agg_mode), sum(flat)],
                                                         dtype=torch.float64)).tolist()
        for (idx, batch, per), chunk in zip(batches, lengths):
            mask, count = batch["mask"], sum(chunk)
            if train_actor:
                with self.precision():
                    logp, entropy = response_logps(self.actor, batch, c.temperature, entropy=True)
                old = per["old_logp"] if "old_logp" in per else logp.detach()
                weights = token_weights(mask, c.loss_agg_mode, max_len)
                loss, clipped = policy_loss(logp, old, per["advantages"], c.cliprange, c.cliprange_high, c.dual_clip)
                if "sampler_logp" in per:  # the sampler and the trainer disagree on the tokens' log-probs
                    _add_metrics(metrics, {"logp_gap": (((old - per["sampler_logp"]).abs() * mask).sum(), count)})
                _add_metrics(metrics, {"policy_loss": ((loss * weights).sum(), units),
                                       "clip_fraction": ((clipped * mask).sum(), count),
                                       "entropy": ((entropy.detach() * mask).sum(), count),
                                       "approx_kl": ((0.5 * (logp.detach() - old) ** 2 * mask).sum(), count)})
                if c.use_kl_loss and "ref_logp" in per:
                    kl = adv.kl_per_token(logp, per["ref_logp"], c.kl_estimator)
                    loss = loss + self.kl.value * kl
                    if exp.old_logp is None:  # the KL was not measured before the update: measure it here
                        _add_metrics(metrics, {"kl": ((kl.detach() * mask).sum(), count)})
                if c.entropy_coef:
                    loss = loss - c.entropy_coef * entropy
                ((loss * weights).sum() / units * 1.0).backward()
            if self.critic is not None:
                with self.precision():
                    values = response_values(self.critic, batch)
                vloss, vclipped = value_loss(values, per["old_values"], per["returns"], c.cliprange_value)
                ((vloss * mask).sum() / tokens).backward()
                _add_metrics(metrics, {"value_loss": ((vloss.detach() * mask).sum(), tokens),
                                       "value_clip_fraction": ((vclipped * mask).sum(), count)})
        info = {}
        for name, model in (("actor", self.actor), ("critic", self.critic)):
            if model is None or (name == "actor" and not train_actor):
                continue
            params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
            if self.world > 1:
                for p in params:
                    dist.all_reduce_sum(p.grad)
            if c.max_grad_norm > 0:
                info[f"{name}_grad_norm"] = torch.nn.utils.clip_grad_norm_(params, c.max_grad_norm)  # read when logged
            info[f"{name}_lr"] = schedulers[name].get_last_lr()[0]
            optimizers[name].step()
            schedulers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
        return info

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward of greedy completions on the held-out prompts (every rank scores its share)."""
        mine = self.eval_prompts[self.rank::self.world]
        sums: dict = {}
        if mine:
            rollouts = self.sampler.sample([p for p, _ in mine], max_new_tokens=self.c.max_completion_length,
                                           temperature=0.0)
            total, parts = self.rewards(Scored([row for _, row in mine], [r.text for r in rollouts]))
            n = len(mine)
            _add_metrics(sums, {"reward": (total.sum().item(), n), **{k: (v * n, n) for k, v in parts.items()},
                                "response_length": (sum(len(r.response_ids) for r in rollouts), n)})
        return _reduce_metrics(sums, "eval_")

    # -- the run ----------------------------------------------------------------------------------
    def resume(self, trained: nn.Module, optimizers: _Together, schedulers: _Together, total: int) -> int:
        """Load `resume_from_checkpoint` (if set and found) into the models, optimizers and schedulers;
        returns the number of steps already done (0 for a fresh run)."""
        path = checkpoint.resolve_resume(self.c.resume_from_checkpoint, self.output_dir)
        if path is None:
            return 0
        state = checkpoint.load_checkpoint(path, model=trained, optimizer=optimizers, scheduler=schedulers,
                                           device=self.device)
        plan = (self.steps_per_epoch(), total)
        if (state.get("steps_per_epoch"), state.get("total_steps")) != plan:
            raise ConfigError(f"{path}: the checkpoint was written for {state.get('steps_per_epoch')} steps per epoch "
                              f"and {state.get('total_steps')} steps in all, this run has {plan[0]} and {plan[1]}; "
                              "resume with the same prompts, batch sizes, max_steps and process count")
        self.kl.value = state["kl_coef"]
        vars(self.moments).update(state["reward_moments"])
        log.info("resumed from %s (step %d of %d)", path, state["step"], total)
        return state["step"]

    def train(self) -> dict:
        c = self.c
        seed_everything(c.seed)
        total = self.total_steps()
        updates = total * c.ppo_epochs * self.minibatches
        optimizers, schedulers = {}, {}
        optimizers["actor"] = build_optimizer(self.actor, c)
        schedulers["actor"] = build_scheduler(optimizers["actor"], c, updates)
        if self.critic is not None:
            critic_args = c.model_copy(update={"learning_rate": c.critic_learning_rate})
            optimizers["critic"] = build_optimizer(self.critic, critic_args)
            schedulers["critic"] = build_scheduler(optimizers["critic"], critic_args, updates)
        # What a checkpoint holds: the trainable weights of both models (as "actor.*" / "critic.*"), both
        # optimizers and schedulers, and below the KL coefficient and the reward statistics. The rest of a
        # step (its prompts, its samples' seeds, the update's shuffles) follows from the seed and the step.
        trained = nn.ModuleDict({"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})})
        both_optimizers, both_schedulers = _Together(optimizers), _Together(schedulers)
        if dist.is_main():
            checkpoint.remove_leftovers(self.output_dir)
        done = self.resume(trained, both_optimizers, both_schedulers, total)
        logger = MetricsLogger(self.output_dir, c.report_to, c.model_dump(mode="json"), resume_step=done) \
            if dist.is_main() else None
        completions = CompletionLog(self.output_dir, c.log_completions_per_step, done) \
            if dist.is_main() and c.log_completions else None
        # A resumed run's alarms compare with its first steps, as the uninterrupted run's would.
        alarms = Alarms(c.alarms, read_metrics(logger.path) if logger and done and logger.path.exists() else [])
        eval_every = c.eval_steps or c.logging_steps * 10
        evals = {}
        if self.eval_prompts and not done:
            evals = self.evaluate()
        if logger and not done:
            logger.log({"step": 0, **self.summary, **evals})
        bar = tqdm(total=total, initial=done, disable=c.disable_tqdm or not dist.is_main(), dynamic_ncols=True,
                   desc="rl")
        window: dict = {}
        watch = DivergenceWatch(c.learning_rate)
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        for self.step in range(done + 1, total + 1):
            timings = {}
            t = time.perf_counter()
            rollouts, rows = self.rollout(self.step, self.step_prompts(self.step - 1))
            timings["generation_s"] = time.perf_counter() - t
            t = time.perf_counter()
            raw, per_source = self.rewards.score(Scored(rows, [r.text for r in rollouts]))
            parts = self.rewards.means(per_source)
            rewards = self.shape_rewards(raw)
            timings["reward_s"] = time.perf_counter() - t
            t = time.perf_counter()
            # The KL needs the old log-probs before the update whenever it goes into the reward.
            need_old = self.need_old or (self.reference is not None and not c.use_kl_loss)
            exp = score_rollouts(rollouts, actor=self.actor, reference=self.reference, critic=self.critic,
                                 pad_id=self.tokenizer.pad_token_id, device=self.device,
                                 batch_size=self.score_batch, temperature=c.temperature,
                                 need_old=need_old, precision=self.precision, min_saved=self.min_saved)
            metrics: dict = {}
            self.advantages(exp, rewards, metrics)
            timings["experience_s"] = time.perf_counter() - t
            if completions:  # before the update: the advantages it trains on
                k = min(c.log_completions_per_step, len(rollouts))
                completions.write(self.step, rows, rollouts, raw, per_source, self.rewards.names,
                                  token_means(exp.advantages[:k], exp.mask[:k]))
            t = time.perf_counter()
            train_actor = self.step > c.critic_warmup_steps or self.critic is None
            info = self.update(exp, optimizers, schedulers, train_actor, metrics)
            timings["train_s"] = time.perf_counter() - t
            # Checked every step: the next rollouts would sample from NaN weights.
            watch.note(self.step, *(v for k, v in info.items() if k.endswith("_grad_norm")),
                       *(metrics[k][0] for k in ("policy_loss", "value_loss") if k in metrics))
            watch.check()
            if "kl" in metrics and self.kl.target is not None:
                kl_sum, kl_count = host_floats(metrics["kl"])
                self.kl.update(kl_sum / max(kl_count, 1), self.per_step * self.world)
            n = len(rollouts)
            lengths = torch.tensor([float(len(r.response_ids)) for r in rollouts])
            _add_metrics(metrics, {"reward": (raw.sum().item(), n), "reward_sq": ((raw ** 2).sum().item(), n),
                                   **{k: (v * n, n) for k, v in parts.items()},
                                   "response_length": (lengths.sum().item(), n),
                                   "truncated": (sum(not r.stopped for r in rollouts), n)})
            if exp.old_values is not None:
                ret, val, m = exp.returns, exp.old_values, exp.mask
                count = m.sum()
                _add_metrics(metrics, {"returns": ((ret * m).sum(), count), "returns_sq": ((ret ** 2 * m).sum(), count),
                                       "residual": (((ret - val) * m).sum(), count),
                                       "residual_sq": (((ret - val) ** 2 * m).sum(), count)})
            _add_metrics(window, metrics)
            _add_metrics(window, {k: (v, 1) for k, v in timings.items()})  # logged as means per step
            if self.step % c.logging_steps == 0 or self.step == total:
                record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch(), 4),
                          **_summarize(_reduce_metrics(window)), "kl_coef": round(self.kl.value, 6),
                          **{k: round(v, 6) for k, v in zip(info, host_floats(list(info.values())))}}
                record.update(alarms.check(record))
                window = {}
                if logger:
                    logger.log(record)
                bar.set_postfix(reward=f"{record.get('reward_mean', 0):.3f}", kl=f"{record.get('kl', 0):.4f}")
            if self.eval_prompts and (self.step % eval_every == 0 or self.step == total):
                evals = self.evaluate()
                if logger:
                    logger.log({"step": self.step, **evals})
            if c.save_steps and self.step % c.save_steps == 0 and self.step < total:
                if dist.is_main():
                    checkpoint.save_checkpoint(
                        self.output_dir, self.step, model_state=trainable_state(trained),
                        optimizer=both_optimizers, scheduler=both_schedulers,
                        trainer_state={"steps_per_epoch": self.steps_per_epoch(), "total_steps": total,
                                       "kl_coef": self.kl.value, "reward_moments": vars(self.moments)},
                        keep=c.save_total_limit)
                dist.barrier()
            bar.update(1)
        bar.close()
        check_finite_weights(trained)
        plot = None
        if dist.is_main():
            write_final(self.output_dir, self.save_final)
            logger.close()
            if c.plot_loss:
                plot = plot_metrics(logger.path, self.output_dir / "training_reward.png",
                                    keys=("reward_mean", "eval_reward"), title="reward",
                                    extra_keys=("kl", "response_length", "entropy", "value_loss"))
        dist.barrier()
        metrics = read_metrics(self.output_dir / "metrics.jsonl") if dist.is_main() else []
        return {"steps": total, "output_dir": self.output_dir, "plot": plot, "metrics": metrics,
                "eval": evals}


def _summarize(m: dict) -> dict:
    """Window means to the logged names: reward mean/std, explained variance from its moments."""
    out = {k: v for k, v in m.items() if k not in ("reward", "reward_sq", "returns", "returns_sq", "residual",
                                                   "residual_sq")}
    if "reward" in m:
        out["reward_mean"] = m["reward"]
        out["reward_std"] = round(math.sqrt(max(m["reward_sq"] - m["reward"] ** 2, 0.0)), 6)
    if "returns" in m:
        var_returns = m["returns_sq"] - m["returns"] ** 2
        var_residual = m["residual_sq"] - m["residual"] ** 2
        out["explained_variance"] = round(1 - var_residual / var_returns, 6) if var_returns > 1e-12 else 0.0
    return out
