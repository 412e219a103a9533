"""Stop a diverging run: a non-finite loss or gradient norm ends training with a clear error, and
nothing non-finite is written as the final model.

The flag stays on the device (no read-back per step: on a GPU each one waits for the device) and is
read whenever the loop reads its numbers anyway: when it logs, before a checkpoint, at the end.
Every rank adds its flag into the check, so all of them stop together instead of some waiting
forever in a collective call.
"""

from __future__ import annotations

import torch

from posttrain.errors import PosttrainError
from posttrain.train import distributed as dist
from posttrain.train.parallel import local


class TrainingDiverged(PosttrainError):
    """The loss or the gradients became NaN or infinite."""


class DivergenceWatch:
    def __init__(self, learning_rate: float):
        self.learning_rate = learning_rate
        self.bad_steps: torch.Tensor | float = 0.0  # optimizer steps with a non-finite value so far
        self.first_bad: torch.Tensor | None = None  # the first such step (this rank's)

    def note(self, step: int, *values) -> None:
        """Values of one optimizer step (loss sums, gradient norms); None and plain numbers are fine."""
        tensors = [torch.as_tensor(v, dtype=torch.float32).reshape(()) for v in values
                   if v is not None and not torch.is_tensor(v)]
        tensors += [v.detach().float().reshape(()) for v in values if torch.is_tensor(v)]
        if not tensors:
            return
        device = tensors[-1].device
        bad = ~torch.isfinite(torch.stack([t.to(device) for t in tensors])).all()
        self.bad_steps = self.bad_steps + bad.to(torch.float64)
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # A Python step number, not a new device tensor each step (each would be a host-to-device copy).
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)

    def check(self) -> None:
        """Raise `TrainingDiverged` if any rank saw a non-finite step since the run began."""
        local = [float(self.bad_steps)] if not torch.is_tensor(self.bad_steps) else [self.bad_steps.item()]
        if dist.all_reduce_sum(torch.tensor(local, dtype=torch.float64))[0].item() == 0:
            return
        first = int(self.first_bad.item()) if self.first_bad is not None else -1
        at = f" at optimizer step {first}" if first >= 0 else ""
        raise TrainingDiverged(
            f"training diverged: the loss or the gradient norm became NaN or infinite{at} (learning_rate "
            f"{self.learning_rate:g}); stopped without writing a final model (checkpoints written before are finite). Lower learning_rate, "
            "keep max_grad_norm > 0, use bf16 rather than fp16, or look for extreme rows in the data")


def check_finite_weights(model: torch.nn.Module) -> None:
    """The trained parameters are all finite (one read for all of them): the last guard before a save.
    Collective: every rank calls it and all raise together."""
    # Each rank checks the part of a sharded parameter it holds; the sum over ranks covers them all.
    flags = [(~torch.isfinite(local(p).detach())).any() for p in model.parameters() if p.requires_grad]
    bad = torch.stack([f.to(flags[0].device) for f in flags]).sum().item() if flags else 0.0
    if dist.all_reduce_sum(torch.tensor([bad], dtype=torch.float64))[0].item() > 0:
        raise TrainingDiverged("training diverged: some trained weights are NaN or infinite; stopped without "
                               "writing a final model. Lower learning_rate or keep max_grad_norm > 0")
