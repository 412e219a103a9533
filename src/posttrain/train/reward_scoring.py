"""Rewards of tokenized responses from a reward-model folder: what `posttrain score` and the RL reward share.

A `posttrain rm` folder scores with its scalar head at the response's last token (model/reward.py). A
`posttrain dpo` folder scores with its implicit reward, beta * (log pi(y|x) - log pi_ref(y|x)) summed over the
response's tokens: the reward DPO fits to the pairs (Rafailov et al., 2023), as RewardBench scores DPO models.
It judges a response token by token through the language model's own predictions, which a head read at the
last token learns only slowly. Either way responses are rendered and cut as the folder's stage trained on them
(its recorded template and cutoff_len).
"""

from __future__ import annotations

import torch

from posttrain.model.loading import load_for_inference, load_model, load_tokenizer, resolve_model_path
from posttrain.model.reward import (implicit_reward_settings, load_reward_model, reward_stats, trained_settings,
                                    trained_template)
from posttrain.train.logps import compute_logps
from posttrain.train.rm import score_sequences


class RewardScorer:
    """`scorer(sequences, batch_size)` -> one reward per sequence; check the folder (check_is_reward_model) first."""

    def __init__(self, path: str, device: torch.device, trust_remote_code: bool = False, what: str = "model"):
        self.implicit = implicit_reward_settings(path)
        self.device, self.reference = device, None
        if self.implicit is None:
            resolve_model_path(path, what)  # `what` named in the error when the folder is not there
            self.tokenizer = load_tokenizer(path, trust_remote_code)
            self.model = load_reward_model(path, device=device, trust_remote_code=trust_remote_code)
            self.stats = reward_stats(path)
        else:
            # A LoRA policy's reference is its own base with the adapter disabled, as DPO trained it.
            self.model, self.tokenizer = load_for_inference(path, device=device, trust_remote_code=trust_remote_code)
            if not self.implicit["adapter_on_reference"]:
                self.reference = load_model(self.implicit["reference"], device=device,
                                            trust_remote_code=trust_remote_code)
                self.reference.requires_grad_(False).eval()
            self.stats = None
        self.model.requires_grad_(False).eval()
        trained = trained_settings(path)
        self.template = trained_template(trained.get("template"), self.tokenizer)
        self.cutoff_len = trained.get("cutoff_len")

    @property
    def kind(self) -> str:
        return "implicit (DPO)" if self.implicit else "reward head"

    def __call__(self, sequences: list, batch_size: int) -> torch.Tensor:
        pad_id = self.tokenizer.pad_token_id
        if self.implicit is None:
            return score_sequences(self.model, sequences, pad_id=pad_id, device=self.device, batch_size=batch_size)
        own = compute_logps(self.model, sequences, pad_id=pad_id, device=self.device, batch_size=batch_size,
                            disable_adapter=False)
        reference = compute_logps(self.reference or self.model, sequences, pad_id=pad_id, device=self.device,
                                  batch_size=batch_size)
        return self.implicit["beta"] * (own - reference)
