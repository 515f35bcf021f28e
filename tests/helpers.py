"""Callbacks the tests inject into real runs through Hydra (``+callbacks.<name>._target_=tests.helpers...``), and
checks several test files share."""

import os
import signal

import lightning as L
import torch

TOL = {"rtol": 1e-9, "atol": 1e-9}  # float64: the sparse backends differ by round-off only (~1e-14 measured)


def assert_backends_agree(
    objectives: list, inputs: torch.Tensor, visible: torch.Tensor, min_gradients: int
) -> None:
    """Two SparK objectives (masked-dense, MinkowskiEngine) on the same float64 inputs and mask: the same loss and
    the same gradient for every parameter that gets one (at least ``min_gradients`` of them)."""
    losses = []
    for objective in objectives:
        loss, prediction = objective.train()(inputs, visible)
        loss.backward()
        losses.append(loss)
    assert prediction.shape == inputs.shape
    torch.testing.assert_close(losses[0], losses[1], **TOL)
    grads = [{n: p.grad for n, p in o.named_parameters() if p.grad is not None} for o in objectives]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) >= min_gradients
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], **TOL, msg=name)


class KillAtStep(L.Callback):
    """SIGKILL the process (no clean-up, like a crash or a pre-empted job) after optimizer step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class TermAtStep(KillAtStep):
    """SIGTERM the process (SLURM pre-emption, ``docker stop``) after optimizer step ``step``."""

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class FailOnRank(L.Callback):
    """Raise at the end of training on the DDP process of global rank ``rank`` (a rank that fails late)."""

    def __init__(self, rank: int):
        self.rank = rank

    def on_fit_end(self, trainer, *args) -> None:
        if trainer.global_rank == self.rank:
            raise RuntimeError(f"FailOnRank: rank {self.rank} fails on purpose")
