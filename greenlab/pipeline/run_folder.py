"""One run per folder, and a finished or running run is never touched.

``RunFolderGuard`` is a Hydra callback: ``on_run_start`` runs before Hydra writes anything into the run folder
(its ``.hydra/*.yaml`` and log), so a refused re-run leaves the earlier run exactly as it was. It refuses
- a folder holding a finished run (results.json) or one that finished training (backbone.pth);
- a folder another greenlab process is running in (``run.lock``, see ``RunLock``);
- a folder with checkpoints but nothing to resume from (``resume_source``);
- resuming an interrupted run with a different config: every key but the budget and logging
  (``RESUME_MAY_CHANGE``) must equal the stored ``.hydra/config.yaml``, else the differing keys are named
  (``resume.allow_config_change=true`` resumes anyway; the change is recorded in
  ``.hydra/attempt-<n>/resume_changes.json``).
Before a resumed attempt, the earlier attempt's ``.hydra`` folder is copied to ``.hydra/attempt-<n>/``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pickle
import shutil
import socket
import zipfile
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from greenlab.config import check_values

log = logging.getLogger(__name__)

FINISHED = (("results.json", "a finished run"), ("backbone.pth", "a run that finished training"))
RESUME_MAY_CHANGE = (
    "trainer.max_epochs",
    "logger.",
    "resume.",
    "callbacks.progress_bar.",
    "callbacks.checkpoint.",
    "callbacks.latest.",
    "data.num_workers",
)


def primary_process() -> bool:
    """False in the worker processes a DDP launcher or SLURM starts (before Lightning knows its rank): they
    run in their rank 0's folder, which rank 0 has checked and locked."""
    return all(os.environ.get(v, "0") == "0" for v in ("LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "RANK"))


def refuse_finished(folder: Path) -> None:
    for done, what in FINISHED:
        if (folder / done).exists():
            raise FileExistsError(f"{folder} already holds {what} ({done}); choose a new output directory")


def resumed_files(checkpoints: Path) -> list[Path]:
    """``resumed-from-<n>.ckpt`` files, oldest attempt first."""
    return sorted(checkpoints.glob("resumed-from-*.ckpt"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))


def resume_source(folder: Path, named: str | None = None) -> Path | None:
    """The checkpoint a run in ``folder`` resumes from, or None for a new run: ``named`` (``resume.from``:
    ``epoch-4``, ``epoch004`` or a file name in checkpoints/), else last.ckpt, else the newest
    resumed-from file (an attempt that ended before saving). A folder with checkpoints but none of these is
    refused. Only chooses: the run checks the chosen file once (``check_checkpoint``) before resuming."""
    checkpoints = Path(folder) / "checkpoints"
    last = checkpoints / "last.ckpt"
    earlier = resumed_files(checkpoints)
    if named:
        epoch = named[len("epoch-") :]
        chosen = checkpoints / (
            f"epoch{int(epoch):03d}" if named.startswith("epoch-") and epoch.isdigit() else named
        )
        chosen = chosen if chosen.suffix == ".ckpt" else chosen.with_name(chosen.name + ".ckpt")
        if not chosen.is_file():
            raise FileNotFoundError(f"resume.from={named}: no {chosen}")
    elif last.is_file():
        chosen = last
    elif earlier:
        chosen = earlier[-1]
    elif checkpoints.is_dir() and any(checkpoints.iterdir()):
        raise FileExistsError(f"{checkpoints} holds checkpoints but no last.ckpt to resume from")
    else:
        return None
    return chosen


def check_checkpoint(checkpoint: Path, checkpoints: Path) -> None:
    """A checkpoint is a zip archive (torch.save) whose members all pass their CRC, and it loads with
    ``weights_only=True`` (tensors and plain containers: a planted file cannot run code; read memory-mapped,
    so the weights are not read twice). Otherwise an error naming it and the newest intact epoch checkpoint
    (``resume.from=...``)."""
    problem = _zip_problem(checkpoint)
    if problem is None:
        import torch

        try:
            torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise ValueError(f"{checkpoint} holds more than tensors and plain containers; refused unloaded "
                             f"(weights_only=True): {str(err).strip().splitlines()[-1]}") from None  # fmt: skip
        return
    epochs = sorted(checkpoints.glob("epoch*.ckpt"), reverse=True)
    intact = next((p for p in epochs if p != checkpoint and _zip_problem(p) is None), None)
    offer = (f"resume from the newest intact epoch checkpoint with resume.from={intact.stem}" if intact
             else "no intact epoch checkpoint is left: start a new output folder")  # fmt: skip
    raise ValueError(f"{checkpoint} is truncated or unreadable ({problem}); {offer}")


def _zip_problem(path: Path) -> str | None:
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    return f"member {bad} fails its CRC" if bad else None


def flatten(node, prefix: str = "") -> dict:
    """{dotted key: leaf value} of a plain container."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): node}


def config_changes(stored: dict, now: dict) -> dict[str, list]:
    """{key: [stored value, new value]} for every key that differs, apart from ``RESUME_MAY_CHANGE``."""
    before, after = flatten(stored), flatten(now)
    keys = sorted(set(before) | set(after))
    return {
        k: [before.get(k), after.get(k)]
        for k in keys
        if before.get(k) != after.get(k) and not any(k == p or k.startswith(p) for p in RESUME_MAY_CHANGE)
    }


class RunLock:
    """``run.lock`` in the run folder: {pid, host, started} of the process running there, created atomically
    (O_EXCL). A lock of a process that no longer exists on this host is stale: replaced, with a warning."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / "run.lock"
        self.held = False

    def holder(self) -> dict | None:
        """The live process holding the lock, or None (no lock, or a stale one)."""
        try:
            info = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": "?", "started": "?", "unreadable": True}
        if info.get("host") == socket.gethostname() and not _alive(info.get("pid")):
            return None
        return info

    def refuse_if_held(self) -> None:
        info = self.holder()
        if info is not None:
            raise RuntimeError(
                f"{self.path.parent} is in use by process {info.get('pid')} on {info.get('host')} since "
                f"{info.get('started')} ({self.path}); wait for it, or delete the lock if that process is gone"
            )

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.refuse_if_held()
            log.warning("removing the stale lock of a process that has ended: %s", self.path.read_text())
            self.path.unlink(missing_ok=True)
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:  # another process won the race
            self.refuse_if_held()
            raise
        with os.fdopen(fd, "w") as f:
            json.dump(info, f)
        self.held = True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError, TypeError):
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


class RunFolderGuard(Callback):
    """Hydra callback (conf/hydra/default.yaml): the checks above, before Hydra writes into the folder. Hydra
    turns a callback's exception into a warning and carries on, so a refusal exits here (SystemExit, code 1)."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        if not primary_process():
            return
        try:
            self.check(config)
        except (OSError, RuntimeError, ValueError) as refusal:
            raise SystemExit(f"greenlab: {refusal}") from None

    def check(self, config: DictConfig) -> None:
        check_values(config)  # bad values: refused before a run folder is even made
        folder = Path(OmegaConf.select(config, "hydra.run.dir"))
        if not folder.exists():
            return
        refuse_finished(folder)
        RunLock(folder).refuse_if_held()
        stored = folder / ".hydra" / "config.yaml"
        if resume_source(folder, OmegaConf.select(config, "resume.from")) is None or not stored.is_file():
            return
        now = OmegaConf.to_container(config, resolve=False)
        now.pop("hydra", None)
        changes = config_changes(OmegaConf.to_container(OmegaConf.load(stored), resolve=False), now)
        if changes and not OmegaConf.select(config, "resume.allow_config_change", default=False):
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in changes.items()))
            raise ValueError(
                f"{folder}: resuming with a different config ({listed}); only the budget and logging may change "
                f"({', '.join(RESUME_MAY_CHANGE)}). Use a new folder, or resume.allow_config_change=true"
            )
        attempt = 1 + len(list((folder / ".hydra").glob("attempt-*")))
        kept = folder / ".hydra" / f"attempt-{attempt}"
        kept.mkdir()
        for file in (folder / ".hydra").glob("*.yaml"):
            shutil.copy2(file, kept / file.name)
        if changes:
            (kept / "resume_changes.json").write_text(json.dumps(changes, indent=2, default=str))
            log.warning(
                "resuming %s with config changes (resume.allow_config_change=true): %s", folder, changes
            )
