"""The RL loop. Each step, read top to bottom:

1. rollout     `rollout_batch_size` prompts x `num_generations` completions from the actor (rollout.py)
2. reward      the weighted rewards (rewards.py); optional running normalization and clipping
3. experience  old / reference log-probs and the critic's values, no gradients (experience.py)
4. advantages  KL penalty in the reward or not, then GAE or a group baseline, whitening (advantages.py)
5. update      `ppo_epochs` passes over the rollout in shuffled mini-batches, one optimizer step each
               for the actor and one for the critic (losses.py); the actor waits for `critic_warmup_steps`
6. metrics     one metrics.jsonl line per step (with alarms.py's flags), held-out greedy reward every
               `eval_steps`; a sample of the step's completions in rollouts.jsonl (completions.py)

The update runs two objectives of the loop's form (objectives.py: the actor's policy loss, the
critic's value loss), each wrapped for several ranks as every stage's objective is (DDP syncs the
gradients). Loss sums are divided by the units of the whole optimizer step over all micro-batches
and all ranks, as in train/loop.py. The run's logging, evaluation cadence, checkpoints, divergence
watch and final write are run_log.RunRecorder's, as for every stage.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import time
from collections import deque
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from posttrain.data.chat import resolve_template
from posttrain.data.prompts import Prompt
from posttrain.data.templates import end_of_turn_ids
from posttrain.errors import ConfigError
from posttrain.train import distributed as dist
from posttrain.train.loop import autocast, seed_everything
from posttrain.train.parallel import Parallel, local_numel
from posttrain.train.reporting import read_metrics
from posttrain.train.rl import advantages as adv
from posttrain.train.rl.alarms import Alarms
from posttrain.train.rl.completions import CompletionLog, token_means
from posttrain.train.rl.experience import Experience, collate_rollouts, score_rollouts, shares_prompts
from posttrain.train.rl.losses import loss_units
from posttrain.train.rl.objectives import PolicyObjective, ValueObjective
from posttrain.train.rl.rewards import CompletionBatch, Rewards
from posttrain.train.rl.rollout import Rollout, RolloutSampler, vllm_options
from posttrain.train.rl.shared_prompt import min_saved_positions
from posttrain.train.run_log import RunRecorder, add_metrics, host_floats, reduce_metrics

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


class _CombinedState:
    """The actor's and the critic's optimizers (or schedulers) saved to and restored from one state; the
    optimizers through `parallel` with their wrapped objectives in `modules`."""

    def __init__(self, parts: dict, parallel: Parallel | None = None, modules: dict | None = None):
        self.parts, self.parallel, self.modules = parts, parallel, modules

    def state_dict(self) -> dict | None:
        """Every part's state; None for a sharded run's optimizers (they are in each rank's shards)."""
        if self.parallel is not None and self.parallel.sharded:
            return None
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def load_from(self, state: dict | None, folder: Path) -> None:
        """The optimizers' state from checkpoint `folder` (a sharded run's from each part's shards there)."""
        for name, part in self.parts.items():
            self.parallel.load_optimizer_state(self.modules[name], part, None if state is None else state[name],
                                               folder, name)


class RLTrainer:
    def __init__(self, config, *, actor: nn.Module, critic: nn.Module | None, reference, rewards: Rewards,
                 tokenizer, prompts: list[tuple[list[int], Prompt]], eval_prompts: list[tuple[list[int], Prompt]],
                 device: torch.device, save_final: Callable[[Path], None], summary: dict | None = None,
                 placed=None, retain_prompts: list[tuple[list[int], Prompt]] = ()):
        """`placed`: a placement.RaySession when the roles run in Ray actors (the sampler then samples there).
        `retain_prompts`: a skill the run must keep, evaluated beside `eval_prompts` as eval_retain_*."""
        self.config = config
        self.actor, self.critic, self.reference = actor, critic, reference
        self.rewards, self.tokenizer, self.device = rewards, tokenizer, device
        self.prompts, self.eval_prompts = prompts, eval_prompts
        self.eval_sets = {prefix: rows for prefix, rows in (("eval_", eval_prompts), ("eval_retain_", retain_prompts))
                          if rows}
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
        self.parallel = Parallel(config, device)
        # The update's forward runs each prompt of a micro-batch once where the models allow it (shared_prompt.py).
        # Not when sharded: gradients through the prompt's cached keys and values reach a layer's weights outside
        # the hooks that gather them for the backward.
        self.share_prompts = shares_prompts(actor, with_grad=True) and (
            critic is None or shares_prompts(critic, with_grad=True, critic=True)) and not self.parallel.sharded
        # On a GPU only where the skipped prompt positions outweigh the second pass's launches (scoring and update;
        # measured with a backward, taken as is for scoring's forward-only passes).
        self.min_saved = min_saved_positions(actor, device)
        # Scoring keeps no activations for a backward, so it fits in batches as large as the update's micro-batches
        # (as TRL scores); fewer, larger forwards are much faster for small models (per-call overhead dominates).
        self.score_batch = max(config.per_device_eval_batch_size, config.per_device_train_batch_size)
        self.kl = adv.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        self.moments = RunningMoments()
        self.precision = lambda: autocast(device, config)
        # The loop's step functions take a loss scaler; the RL update has none (a no-op scaler).
        self.scaler = torch.amp.GradScaler(device.type, enabled=False)
        # Completions end where the template ends an assistant turn, as SFT trained them to (not only at EOS).
        end_of_turn = end_of_turn_ids(tokenizer, resolve_template(config.template, tokenizer))
        # Sharded, the actor's parameters are only this rank's parts: rollouts and the old log-probs come from a
        # whole copy, refreshed from the shards before each step's rollouts (`sync_rollout_actor`).
        self.rollout_actor = copy.deepcopy(actor) if self.parallel.sharded else actor
        self.sampler = RolloutSampler(self.rollout_actor, tokenizer, max_batch_size=max(self.per_step, 1),
                                      seed=config.seed, end_of_turn=end_of_turn, backend=config.rollout_backend,
                                      vllm_options=vllm_options(config), placed=placed)
        self.sampler_stale = False  # the actor changed since the sampler last saw its weights
        self.weights_version = 0  # actor weights the sampler has been sent (0: the starting ones)
        self.ahead: deque = deque()  # steps whose sampling started before they came (async_rollouts)
        self.summary = {**self.summary, "rollout_backend": self.sampler.backend.name}

    # -- the plan ---------------------------------------------------------------------------------
    def steps_per_epoch(self) -> int:
        mine = len(self.prompts) // self.world
        return max(1, mine // self.config.rollout_batch_size)

    def total_steps(self) -> int:
        if self.config.max_steps > 0:
            return self.config.max_steps
        return max(1, math.ceil(self.config.num_train_epochs * self.steps_per_epoch()))

    def step_prompts(self, step: int) -> list[int]:
        """This rank's prompts for `step` (indices into self.prompts): a seeded shuffle per epoch, split
        across ranks. The step's prompts over all ranks are the same for any number of processes."""
        epoch, k = divmod(step, self.steps_per_epoch())
        order = list(range(len(self.prompts)))
        random.Random(f"{self.config.seed}/{epoch}").shuffle(order)
        mine = order[self.rank::self.world]
        size = self.config.rollout_batch_size
        return [mine[(k * size + j) % len(mine)] for j in range(size)]

    def sample_seed(self, step: int, prompt: int, j: int) -> int:
        """The seed of completion j of prompt `prompt` at `step`: set by the sample itself, not by its row
        or its process, so ranks never share random streams and a run's samples do not depend on how
        many processes share the batch."""
        return random.Random(f"{self.config.seed}/{step}/{prompt}/{j}").getrandbits(63)

    # -- one step ---------------------------------------------------------------------------------
    def start_rollout(self, step: int) -> dict:
        """Begin sampling step `step`'s completions, on the weights the sampler has now."""
        picked = self.step_prompts(step - 1)
        ids = [self.prompts[i][0] for i in picked for _ in range(self.group)]  # each prompt's group, consecutive
        # A prompt picked twice in one step (fewer prompts than a step asks for) gets fresh seeds each time.
        seeds, seen = [], {}
        for i in picked:
            first = seen.get(i, 0) * self.group
            seen[i] = seen.get(i, 0) + 1
            seeds += [self.sample_seed(step, i, first + j) for j in range(self.group)]
        # The sampler's log-probs are of the unscaled logits: comparable with the trainer's at temperature 1 only.
        c = self.config
        started = self.sampler.start(ids, max_new_tokens=c.max_completion_length, temperature=c.temperature,
                                     top_p=c.top_p, top_k=c.top_k, seeds=seeds, logprobs=c.temperature == 1.0)
        return {"step": step, "started": started, "version": self.weights_version}

    def rollout(self, step: int) -> tuple[list[Rollout], list[Prompt], int]:
        """Step `step`'s rollouts, their prompts' rows, and how many actor updates older than the actor's
        weights they were sampled with. Under async_rollouts: N, the sampling of the next N steps starts
        here, before this step trains, so a sampler in another process (vLLM) generates while the trainer
        trains (one-step-off-policy at N = 1, as veRL and OpenRLHF run it); N = 0 samples each step's on
        its own, on-policy. Every backend samples on the same weights either way; only the overlap differs."""
        if not self.ahead or self.ahead[0]["step"] != step:
            self.ahead.appendleft(self.start_rollout(step))
        pending = self.ahead.popleft()
        rollouts = pending["rollouts"] if "rollouts" in pending else self.finish_rollout(pending)
        queued = {p["step"] for p in self.ahead}
        for k in range(step + 1, min(step + self.config.async_rollouts, self.total_steps()) + 1):
            if k not in queued:
                self.ahead.append(self.start_rollout(k))
        rows = [self.prompts[i][1] for i in self.step_prompts(step - 1) for _ in range(self.group)]
        return rollouts, rows, self.weights_version - pending["version"]

    def finish_rollout(self, pending: dict) -> list[Rollout]:
        """A started rollout's samples. A sampler shared by Ray ranks may have served it after another rank's
        update reached it (placement.RayRolloutBackend warns): its version is then the one it was sampled on."""
        rollouts = self.sampler.finish(pending.pop("started"))
        pending["version"] += getattr(self.sampler.backend, "newer_by", 0)
        return rollouts

    def ahead_state(self) -> list[dict]:
        """The rollouts started ahead of their steps, finished and written out, for a checkpoint (each rank's,
        in rank order): a resumed run trains on the very samples the uninterrupted one does."""
        for pending in self.ahead:
            if "rollouts" not in pending:
                pending["rollouts"] = self.finish_rollout(pending)
        mine = [{"step": p["step"], "version": p["version"], "rollouts": [vars(r) for r in p["rollouts"]]}
                for p in self.ahead]
        return dist.gather_objects(mine) if self.config.async_rollouts else []

    def shape_rewards(self, raw: torch.Tensor) -> torch.Tensor:
        rewards = raw
        if self.config.normalize_reward:  # over every rank's rewards, then this batch scaled by the running stats
            stats = dist.all_reduce_sum(torch.tensor([raw.sum().item(), (raw ** 2).sum().item(), float(raw.numel())],
                                                     dtype=torch.float64))
            self.moments.update(*stats.tolist())
            rewards = (raw - self.moments.mean) / math.sqrt(self.moments.var + 1e-8)
        if self.config.reward_clip is not None:
            rewards = rewards.clamp(-self.config.reward_clip, self.config.reward_clip)
        return rewards

    def advantages(self, exp: Experience, rewards: torch.Tensor, metrics: dict) -> None:
        c, mask = self.config, exp.mask
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
        c = self.config
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
        c = self.config
        # Token counts from the rollouts on the host: reading the device masks would wait for the GPU.
        lengths = [[len(exp.rollouts[i].response_ids) for i in idx] for idx in chunks]
        flat = [n for chunk in lengths for n in chunk]
        units, tokens = dist.all_reduce_sum(torch.tensor([loss_units(flat, c.loss_agg_mode), sum(flat)],
                                                         dtype=torch.float64)).tolist()
        # (name, the objective as trained (DDP-wrapped over several ranks), what its loss sum is divided by)
        trained = ([("actor", self.objectives["actor"], units)] if train_actor else []) + \
            ([("critic", self.objectives["critic"], tokens)] if self.critic is not None else [])
        for k, (idx, chunk) in enumerate(zip(chunks, lengths)):
            batch = collate_rollouts([exp.rollouts[i] for i in idx], self.tokenizer.pad_token_id, self.device,
                                     self.share_prompts, self.min_saved)
            micro = {"batch": batch, "per": exp.rows(idx), "count": sum(chunk), "units": units, "tokens": tokens,
                     "measure_kl": exp.old_logp is None}
            for _, module, divisor in trained:  # each micro-batch through the actor, then the critic
                out = self.parallel.backward(module, micro, scale=self.world / divisor, sync=k == len(chunks) - 1,
                                             scaler=self.scaler, precision=self.precision())
                add_metrics(metrics, out["metrics"])
        info = {}
        for name, _, _ in trained:
            model = self.actor if name == "actor" else self.critic
            norm, lr = self.parallel.step(self.objectives[name], model, optimizers[name], schedulers[name],
                                          self.scaler, c.max_grad_norm)
            if norm is not None:
                info[f"{name}_grad_norm"] = norm  # a device tensor, read when logged
            info[f"{name}_lr"] = lr
        return info

    def sync_rollout_actor(self) -> None:
        """The sampler brought up to the actor's latest weights: the rollout copy of a sharded actor refreshed
        from its shards (collective), then the backend told (vLLM receives the weights); only after a change."""
        if not self.sampler_stale:
            return
        if self.rollout_actor is not self.actor:
            self.parallel.copy_trainable(self.actor, self.rollout_actor)
        self.sampler.update_weights()
        self.sampler_stale = False
        self.weights_version += 1

    # -- evaluation -------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean reward of greedy completions on each eval set: the held-out prompts (eval_*) and the skill to
        retain (eval_retain_*); every rank scores its share."""
        self.sync_rollout_actor()
        evals = {}
        for prefix, prompts in self.eval_sets.items():
            mine = prompts[self.rank::self.world]
            # Every name on every rank, a rank without prompts (fewer than ranks) too: the reduction is collective.
            sums: dict = {name: [0.0, 0.0] for name in ("reward", "response_length",
                                                         *(f"rewards/{n}" for n in self.rewards.names))}
            if mine:
                rollouts = self.sampler.sample([p for p, _ in mine],
                                               max_new_tokens=self.config.max_completion_length, temperature=0.0)
                total, parts = self.rewards(CompletionBatch([row for _, row in mine], [r.text for r in rollouts]))
                n = len(mine)
                add_metrics(sums, {"reward": (total.sum().item(), n), **{k: (v * n, n) for k, v in parts.items()},
                                    "response_length": (sum(len(r.response_ids) for r in rollouts), n)})
            evals.update(reduce_metrics(sums, prefix))
        return evals

    # -- the run ----------------------------------------------------------------------------------
    def resume(self, run: RunRecorder, trained: nn.Module, optimizers: _CombinedState, schedulers: _CombinedState
               ) -> int:
        """Load `resume_from_checkpoint` (if set and found) into the models, optimizers and schedulers;
        returns the number of steps already done (0 for a fresh run)."""
        state = run.resume(model=trained, optimizer=optimizers, scheduler=schedulers, device=self.device,
                           parallel=self.parallel)
        if state is None:
            return 0
        plan = (self.steps_per_epoch(), run.total_steps)
        if (state.get("steps_per_epoch"), state.get("total_steps")) != plan:
            raise ConfigError(f"{state['path']}: the checkpoint was written for {state.get('steps_per_epoch')} steps "
                              f"per epoch and {state.get('total_steps')} steps in all, this run has {plan[0]} and "
                              f"{plan[1]}; resume with the same prompts, batch sizes, max_steps and process count")
        self.sampler_stale = True  # the checkpoint's weights
        self.weights_version = state.get("weights_version", 0)
        self.ahead = deque({"step": p["step"], "version": p["version"],
                            "rollouts": [Rollout(**r) for r in p["rollouts"]]}
                           for p in (state.get("rollouts_ahead") or [[]] * self.world)[self.rank])
        self.kl.value = state["kl_coef"]
        vars(self.moments).update(state["reward_moments"])
        log.info("resumed from %s (step %d of %d)", state["path"], state["step"], run.total_steps)
        return state["step"]

    def train(self) -> dict:
        c = self.config
        seed_everything(c.seed)
        total = self.total_steps()
        updates = total * c.ppo_epochs * self.minibatches
        # The update's objectives, each wrapped for the ranks (DDP or FSDP2, train/parallel.py) as every stage's
        # objective is, with its optimizer and schedule (the critic's at its own learning rate).
        self.objectives, optimizers, schedulers = {}, {}, {}
        parts = {"actor": (PolicyObjective(self.actor, c, self.kl), c)}
        if self.critic is not None:
            parts["critic"] = (ValueObjective(self.critic, c.cliprange_value),
                               c.model_copy(update={"learning_rate": c.critic_learning_rate}))
        for name, (objective, args) in parts.items():
            self.objectives[name], optimizers[name], schedulers[name] = self.parallel.prepare(objective, updates,
                                                                                              args)
        if self.parallel.kind != "single":  # measured after sharding, as the other stages log it
            self.summary = {**self.summary, "parallel": self.parallel.describe(),
                            "rank0_params": sum(local_numel(objective) for objective, _ in parts.values())}
        # What a checkpoint holds: the trainable weights of both models (as "actor.*" / "critic.*"), both
        # optimizers and schedulers, and below the KL coefficient and the reward statistics. The rest of a
        # step (its prompts, its samples' seeds, the update's shuffles) follows from the seed and the step.
        trained = nn.ModuleDict({"actor": self.actor, **({"critic": self.critic} if self.critic is not None else {})})
        both_optimizers = _CombinedState(optimizers, self.parallel, self.objectives)
        both_schedulers = _CombinedState(schedulers)
        run = RunRecorder(c, total_steps=total, desc="rl", run_config=c.model_dump(mode="json"))
        done = self.resume(run, trained, both_optimizers, both_schedulers)
        run.open(done)
        completions = CompletionLog(self.output_dir, c.log_completions_per_step, done) \
            if dist.is_main() and c.log_completions else None
        # A resumed run's alarms compare with its first steps, as the uninterrupted run's would.
        logged = run.logger.path if run.logger else None
        alarms = Alarms(c.alarms, read_metrics(logged) if logged and done and logged.exists() else [], c.retain_metric)
        evals = {}
        if self.eval_sets and not done:
            evals = self.evaluate()
            alarms.check({"step": 0, **evals})  # the values before training, that retain_drop compares with
        if not done:
            run.log({"step": 0, **self.summary, **evals})
        self.actor.train()
        if self.critic is not None:
            self.critic.train()
        try:
            stopped = None
            for self.step in range(done + 1, total + 1):
                info = self.one_step(run, optimizers, schedulers, completions)
                this_step = {}  # this step's logged records: their alarm/<name> flags decide stop_on_alarms
                if run.logs_at(self.step):
                    record = {"step": self.step, "epoch": round(self.step / self.steps_per_epoch(), 4),
                              **_summarize(run.take_window()), "kl_coef": round(self.kl.value, 6),
                              **{k: round(v, 6) for k, v in zip(info, host_floats(list(info.values())))}}
                    record.update(alarms.check(record))
                    this_step.update(record)
                    run.log(record)
                    run.bar.set_postfix(reward=f"{record.get('reward_mean', 0):.3f}", kl=f"{record.get('kl', 0):.4f}")
                if self.eval_sets and run.evaluates_at(self.step):
                    evals = self.evaluate()
                    record = {"step": self.step, **evals}
                    record.update(alarms.check(record))
                    this_step.update(record)
                    run.log(record)
                # Every rank judges the same reduced metrics, so every rank stops at the same step.
                stopped = next((name for name in c.stop_on_alarms if f"alarm/{name}" in this_step), None)
                if stopped:
                    log.warning("stopping at step %d of %d: alarm %s is in stop_on_alarms; the model is saved as "
                                "it is now", self.step, total, stopped)
                    run.log({"step": self.step, f"stopped_by_alarm/{stopped}": 1})
                    run.bar.update(1)
                    break
                if run.saves_at(self.step):
                    run.save(self.step, model_state=self.parallel.trainable_state(trained),
                             optimizer_state=both_optimizers.state_dict(), scheduler=both_schedulers,
                             engine_writer=self.parallel.engine_writer(
                                 {name: (self.objectives[name], optimizers[name]) for name in self.objectives}),
                             trainer_state={"steps_per_epoch": self.steps_per_epoch(), "total_steps": total,
                                            "kl_coef": self.kl.value, "reward_moments": vars(self.moments),
                                            "weights_version": self.weights_version,
                                            "rollouts_ahead": self.ahead_state()})
                run.bar.update(1)
            plot, metrics = run.finish(self.step if stopped else total, trained, self.save_final,
                                       plot_name="training_reward.png",
                                       parallel=self.parallel, saved_model=self.actor,
                                       keys=("reward_mean", "eval_reward"), title="reward",
                                       extra_keys=("kl", "response_length", "entropy", "value_loss"))
        finally:
            self.sampler.close()  # a vLLM worker or a Ray role ends with the run
        return {"steps": self.step if stopped else total, "output_dir": self.output_dir, "plot": plot,
                "metrics": metrics, "eval": evals, "stopped_by_alarm": stopped}

    def one_step(self, run: RunRecorder, optimizers: dict, schedulers: dict, completions) -> dict:
        """Step `self.step`, top to bottom (the module docstring's 1-5); its metrics go into `run`'s window.
        The update's learning rates and gradient norms, logged with the window."""
        c, timings = self.config, {}
        t = time.perf_counter()
        self.sync_rollout_actor()
        rollouts, rows, staleness = self.rollout(self.step)
        timings["generation_s"] = time.perf_counter() - t
        t = time.perf_counter()
        raw, per_source = self.rewards.score(CompletionBatch(rows, [r.text for r in rollouts]))
        parts = self.rewards.means(per_source)
        rewards = self.shape_rewards(raw)
        timings["reward_s"] = time.perf_counter() - t
        t = time.perf_counter()
        # The KL needs the old log-probs before the update whenever it goes into the reward.
        need_old = self.need_old or (self.reference is not None and not c.use_kl_loss)
        with self.parallel.gathered(self.objectives.get("critic")):
            exp = score_rollouts(rollouts, actor=self.rollout_actor, reference=self.reference, critic=self.critic,
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
        self.sampler_stale = self.sampler_stale or train_actor
        timings["train_s"] = time.perf_counter() - t
        # Checked every step: the next rollouts would sample from NaN weights.
        run.watch.note(self.step, *(v for k, v in info.items() if k.endswith("_grad_norm")),
                       *(metrics[k][0] for k in ("policy_loss", "value_loss") if k in metrics))
        run.watch.check()
        if "kl" in metrics and self.kl.target is not None:
            kl_sum, kl_count = host_floats(metrics["kl"])
            self.kl.update(kl_sum / max(kl_count, 1), self.per_step * self.world)
        run.add(metrics)
        run.add(self.rollout_metrics(rollouts, raw, parts, exp))
        run.add({k: (v, 1) for k, v in timings.items()})  # logged as means per step
        run.add({"staleness": (staleness, 1)})
        return info

    @staticmethod
    def rollout_metrics(rollouts: list[Rollout], raw: torch.Tensor, parts: dict, exp: Experience) -> dict:
        """The step's samples as (sum, count) metrics: rewards, lengths, and the critic's fit to the returns."""
        n = len(rollouts)
        lengths = torch.tensor([float(len(r.response_ids)) for r in rollouts])
        out = {"reward": (raw.sum().item(), n), "reward_sq": ((raw ** 2).sum().item(), n),
               **{k: (v * n, n) for k, v in parts.items()},
               "response_length": (lengths.sum().item(), n),
               "truncated": (sum(not r.stopped for r in rollouts), n)}
        if exp.old_values is not None:
            ret, val, m = exp.returns, exp.old_values, exp.mask
            count = m.sum()
            out.update({"returns": ((ret * m).sum(), count), "returns_sq": ((ret ** 2 * m).sum(), count),
                        "residual": (((ret - val) * m).sum(), count),
                        "residual_sq": (((ret - val) ** 2 * m).sum(), count)})
        return out


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
