"""The configs of the stages that train on tokenized sequences: sft, rm, dpo, kto."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config.args import (
    PREF_LOSSES, DataArgs, PromptLearningArgs, QuantizationArgs, ReferenceArgs, SequenceArgs, SFTDataArgs,
    TrainArgs)


class SFTConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, SFTDataArgs):
    """`posttrain sft`: supervised fine-tuning on conversations, or continued pre-training on text."""

    stage: Literal["sft"] = Field("sft", description="the command this file is for")
    learning_rate: float = Field(1e-4, gt=0)


class RMConfig(TrainArgs, DataArgs, SequenceArgs):
    """`posttrain rm`: a reward model (scalar head) trained on preference pairs, Bradley-Terry loss."""

    stage: Literal["rm"] = Field("rm", description="the command this file is for")
    learning_rate: float = Field(1e-5, gt=0)
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="+ c * (r_chosen + r_rejected)^2 in the loss: rewards kept near 0")
    lm_coefficient: float = Field(
        0.0, ge=0, description="+ c * per-token NLL of the chosen response (the LM head; GRM's SFT term)")


class DPOConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, ReferenceArgs):
    """`posttrain dpo`: the DPO family (sigmoid, ipo, hinge, robust, bco_pair) and the reference-free
    SimPO and ORPO, on preference pairs."""

    stage: Literal["dpo"] = Field("dpo", description="the command this file is for")
    learning_rate: float = Field(5e-6, gt=0)
    pref_loss: Literal[PREF_LOSSES] = Field(
        "sigmoid", description="sigmoid (DPO) | ipo | hinge | robust | simpo | orpo | bco_pair")
    pref_beta: float = Field(0.1, gt=0, description="beta of the loss; ORPO's lambda")
    pref_ftx: float = Field(
        0.0, ge=0, description="weight of an NLL term on the chosen response, RPO")
    dpo_label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="label smoothing of sigmoid (cDPO) and robust")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin")

    @model_validator(mode="after")
    def _check_smoothing(self):
        if self.dpo_label_smoothing and self.pref_loss not in ("sigmoid", "robust"):
            raise ValueError(f"dpo_label_smoothing is for pref_loss sigmoid or robust, not {self.pref_loss!r}")
        return self


class KTOConfig(TrainArgs, QuantizationArgs, PromptLearningArgs, DataArgs, SequenceArgs, ReferenceArgs):
    """`posttrain kto`: KTO on unpaired rows (a response and a true/false label)."""

    stage: Literal["kto"] = Field("kto", description="the command this file is for")
    learning_rate: float = Field(5e-6, gt=0)
    pref_beta: float = Field(0.1, gt=0, description="beta of the loss")
    pref_ftx: float = Field(0.0, ge=0, description="weight of an NLL term on desirable rows")
    kto_chosen_weight: float = Field(1.0, gt=0, description="weight of desirable rows")
    kto_rejected_weight: float = Field(1.0, gt=0, description="weight of undesirable rows")
