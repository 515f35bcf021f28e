"""Run folders are never mixed or lost: SIGTERM saves and exits non-zero, a resume must keep the config, one
process per folder, checkpoints load with weights_only=True."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from greenlab.pipeline.run_folder import RunLock, config_changes
from tests.conftest import TINY_RUN, run_cli

REPO = Path(__file__).resolve().parents[1]


def run_tiny(run_dir, data_dir, *extra):
    return run_cli("+experiment=retfound_green", *TINY_RUN, *extra, f"paths.data_dir={data_dir}",
                   f"hydra.run.dir={run_dir}", check=False)  # fmt: skip


def test_sigterm_saves_last_ckpt_exits_143_and_a_changed_resume_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    term = ["+callbacks.term._target_=tests.helpers.TermAtStep", "+callbacks.term.step=2"]
    proc = run_tiny(run, data_dir, *term)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert not (run / "results.json").exists()
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2  # the step reached, not the last epoch end
    record = {p: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")}
    proc = run_tiny(run, data_dir, *term, "trainer.gradient_clip_val=1.0", "trainer.max_epochs=3")
    assert proc.returncode == 1
    assert "resuming with a different config (trainer.gradient_clip_val: 0.1 -> 1.0)" in proc.stderr
    assert {p: p.read_bytes() for p in (run / ".hydra").glob("*.yaml")} == record, (
        "refused before Hydra wrote"
    )
    assert not (run / "checkpoints" / "resumed-from-1.ckpt").exists()


def test_config_changes_ignore_the_budget_and_logging():
    stored = {
        "trainer": {"max_epochs": 2, "precision": "32"},
        "logger": {"wandb": {"mode": "offline"}},
        "seed": 1,
    }
    now = {
        "trainer": {"max_epochs": 9, "precision": "bf16"},
        "logger": {"wandb": {"mode": "online"}},
        "lr": 3,
    }
    assert config_changes(stored, now) == {
        "lr": [None, 3],
        "seed": [1, None],
        "trainer.precision": ["32", "bf16"],
    }


def test_one_process_per_folder_and_stale_locks_replaced(tmp_path, caplog):
    with RunLock(tmp_path) as lock:
        info = json.loads(lock.path.read_text())
        assert info["pid"] == os.getpid()
        with pytest.raises(RuntimeError, match=rf"in use by process {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / "run.lock").exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (tmp_path / "run.lock").write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text


class Planted:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_planted_last_ckpt_cannot_run_code(tmp_path, data_dir):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    (run / "checkpoints").mkdir(parents=True)
    payload = Planted()
    payload.marker = marker
    torch.save({"state_dict": payload}, run / "checkpoints" / "last.ckpt")  # a valid zip, a hostile pickle
    proc = run_tiny(run, data_dir)
    assert (
        proc.returncode != 0
        and "last.ckpt holds more than tensors and plain containers; refused" in proc.stderr
    )
    assert not marker.exists()


def test_a_truncated_last_ckpt_is_named_and_the_newest_intact_epoch_offered(tmp_path):
    from greenlab.pipeline.run import resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    for epoch in (0, 1):
        torch.save({"epoch": epoch}, checkpoints / f"epoch{epoch:03d}.ckpt")
    whole = (checkpoints / "epoch001.ckpt").read_bytes()
    (checkpoints / "last.ckpt").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"last.ckpt is truncated or unreadable .*resume.from=epoch001"):
        resume_checkpoint(tmp_path)
    (checkpoints / "epoch001.ckpt").write_bytes(whole[:-40])  # damaged too: the one before is offered
    with pytest.raises(ValueError, match=r"resume.from=epoch000"):
        resume_checkpoint(tmp_path)
    assert resume_checkpoint(tmp_path, "epoch-0") == checkpoints / "epoch000.ckpt"
    assert (checkpoints / "last.unusable-1.ckpt").is_file() and not (checkpoints / "last.ckpt").exists()


def test_retries_of_a_resume_add_no_copies(tmp_path):
    from greenlab.pipeline.run import resume_checkpoint

    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    torch.save({"step": 7}, checkpoints / "last.ckpt")
    first = resume_checkpoint(tmp_path)
    assert first.name == "resumed-from-1.ckpt" and not (checkpoints / "last.ckpt").exists()
    assert resume_checkpoint(tmp_path) == first  # the attempt died before saving: same state, no new file
    assert sorted(p.name for p in checkpoints.iterdir()) == ["resumed-from-1.ckpt"]


def test_every_torch_load_in_greenlab_says_weights_only_true():
    for path in (REPO / "greenlab").rglob("*.py"):
        for call in re.findall(r"torch\.load\([^)]*\)", path.read_text()):
            assert "weights_only=True" in call, f"{path}: {call}"


def index_data(size: int = 23, batch_size: int = 4):
    """An ImageDataModule whose images are their own indices, to see the order training receives."""
    from greenlab.data.base import ImageDataModule, ItemDataset

    data = ImageDataModule(batch_size=batch_size, eval_batch_size=8, num_workers=0, output_dir=None)
    ids, labels = [str(i) for i in range(size)], torch.zeros(size, 1)
    data.pretrain_set = ItemDataset(ids, lambda i: float(i), labels, torch.tensor)
    return data


def train_recording_order(folder, epochs: int, archive_every: int = 1, stop_after=None, resume=None,
                          extra=()) -> list[tuple[int, list[int]]]:  # fmt: skip
    """(epoch, image indices) of every training batch of a one-parameter model on ``index_data()``, saved by
    greenlab's checkpoint callbacks into ``folder`` (the archive every ``archive_every`` epochs);
    ``stop_after=(epoch, batch)``: SIGTERM as Lightning receives it after that batch (SaveOnInterrupt)."""
    import lightning as L
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from greenlab.callbacks.interruption import SaveOnInterrupt
    from greenlab.config import build

    seen: list[tuple[int, list[int]]] = []

    class Model(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, batch[0].long().tolist()))
            if stop_after == (self.current_epoch, batch_idx):
                os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler: stop after this batch
            return (self.weight - batch[0].float().mean()).pow(2)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    saving = [
        SaveOnInterrupt(folder),
        build("callbacks/default", select="checkpoint", dirpath=str(folder), every_n_epochs=archive_every),
        build("callbacks/default", select="latest", dirpath=str(folder)),
    ]
    L.seed_everything(7)
    trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[*saving, *extra], default_root_dir=folder)  # fmt: skip
    try:
        trainer.fit(Model(), datamodule=index_data(), ckpt_path=resume)
    except SIGTERMException:
        pass
    return seen


@pytest.mark.parametrize("stop_after", [(1, 2), (0, 5)], ids=["mid-epoch", "at an epoch's end"])
def test_a_resumed_run_trains_on_the_order_of_an_uninterrupted_one(tmp_path, stop_after):
    """A plain DataLoader resumed mid-epoch starts a new shuffle (some images twice, others never that
    epoch; Lightning warns): greenlab's resumes with the rest of the interrupted epoch's order."""
    uninterrupted = train_recording_order(tmp_path / "a", epochs=3)
    assert [epoch for epoch, _ in uninterrupted] == [0] * 6 + [1] * 6 + [2] * 6
    for epoch in range(3):  # every image once per epoch, in a new order each epoch
        images = sum((batch for e, batch in uninterrupted if e == epoch), [])
        assert sorted(images) == list(range(23))
    assert uninterrupted[0][1] != uninterrupted[6][1]

    interrupted = train_recording_order(tmp_path / "b", epochs=3, stop_after=stop_after)
    assert interrupted == uninterrupted[: len(interrupted)]
    resumed = train_recording_order(tmp_path / "b", epochs=3, resume=tmp_path / "b" / "last.ckpt")
    assert interrupted + resumed == uninterrupted


def test_a_run_resumed_from_an_epoch_checkpoint_trains_on_the_next_epochs_order(tmp_path):
    """From the archive checkpoint written at the end of epoch 0."""
    uninterrupted = train_recording_order(tmp_path / "a", epochs=3)
    resumed = train_recording_order(tmp_path / "b", epochs=3, resume=tmp_path / "a" / "epoch000.ckpt")
    assert resumed == uninterrupted[6:]


def test_last_ckpt_is_written_after_every_epoch_between_archive_checkpoints(tmp_path):
    """At scale=paper the archive saves every 5 epochs; Lightning >= 2.5 writes ``save_last``'s last.ckpt only
    along an archive checkpoint, so a run killed in epoch 3 had nothing to resume from. The ``latest``
    callback writes it after every epoch; no other file appears between archive epochs."""
    import lightning as L

    found = []

    class LookAtLast(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            last = tmp_path / "last.ckpt"
            found.append(torch.load(last, weights_only=True)["epoch"] if last.exists() else None)

    train_recording_order(tmp_path, epochs=3, archive_every=5, extra=[LookAtLast()])
    assert found == [None, 0, 1]
    assert [p.name for p in tmp_path.glob("*.ckpt")] == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
