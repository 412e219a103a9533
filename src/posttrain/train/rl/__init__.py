"""Reinforcement learning from rewards: PPO (actor + critic), GRPO, Dr.GRPO, RLOO, REINFORCE++.

rollout.py     completions from the actor's live weights (the inference engine)
rewards.py     reward sources: a trained RM, Python functions, built-ins, an HTTP endpoint; weighted
advantages.py  KL estimators and penalties, GAE, group baselines, returns, whitening
losses.py      the clipped policy loss, the clipped value loss, entropy, loss aggregation
experience.py  a rollout turned into training tensors (old / reference log-probs, values, advantages)
trainer.py     the loop: rollout -> experience -> several PPO epochs of mini-batch updates -> metrics
recipe.py      `posttrain ppo` / `posttrain grpo`: config -> rewards -> data -> models -> trainer -> save
"""
