"""What an interrupted run resumes from: ``checkpoints/last.ckpt``.

- After every epoch (``LatestCheckpoint``), so a run killed outright (kill -9, out of memory, power) loses at
  most one epoch.
- On SIGTERM (SLURM pre-emption, ``docker stop``, ``kill``) or Ctrl-C during training, the state reached
  (``SaveOnInterrupt``; atomically: a temporary file renamed); the process then exits non-zero (143 after
  SIGTERM, Lightning's 1 after Ctrl-C), never 0 as if finished. Under SLURM, Lightning's own SLURM plugin
  requeues on the pre-emption signal as usual."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

EXIT_SIGTERM = 143  # 128 + SIGTERM, what a shell reports for a process ended by SIGTERM


class SaveOnInterrupt(L.Callback):
    """Args: dirpath: the checkpoint folder (the ModelCheckpoint's), where ``last.ckpt`` is written."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException | KeyboardInterrupt):
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        partial = self.dirpath / "last.ckpt.partial"
        trainer.save_checkpoint(partial)
        if trainer.is_global_zero:
            os.replace(partial, self.dirpath / "last.ckpt")
            log.warning("interrupted at step %d: saved %s", trainer.global_step, self.dirpath / "last.ckpt")


class LatestCheckpoint(ModelCheckpoint):
    """``last.ckpt`` in ``dirpath`` after every epoch, overwritten. (``ModelCheckpoint(save_last=True)`` beside
    an archive saved every few epochs writes it only along an archive file since Lightning 2.5, and a second
    plain ModelCheckpoint saving every epoch clashes with an every-epoch archive: same state key.)"""

    def __init__(self, dirpath: str):
        super().__init__(
            dirpath, filename="last", enable_version_counter=False, every_n_epochs=1, save_top_k=1
        )

    @property
    def state_key(self) -> str:
        return type(self).__name__
