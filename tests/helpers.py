"""Callbacks the tests inject into real runs through Hydra (``+callbacks.<name>._target_=tests.helpers...``)."""

import os
import signal

import lightning as L


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
