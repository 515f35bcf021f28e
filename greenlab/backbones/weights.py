"""Where a backbone's initial weights come from, reading weights files, and the record of the init used.

``weights`` is resolved by ``resolve_weights``, the same for every backbone:

- ``cached``: the published weights (a ``Pretrained``) if they are in a local cache; never the network.
- ``hub``: those, downloaded when they are not cached.
- ``random``: random init (seeded by the run's seed).
- a path: that file (a missing or unreadable file is an error, never a fallback).

When ``cached`` / ``hub`` cannot be had, a loud warning and random init. Every backbone carries
``init_record`` = {"requested", "used", "source", "note"} (results.json prints it) and
``recipe`` = {"factory": "module.callable", **arguments}: calling the factory with those arguments (and
``weights`` = a file of trained weights) rebuilds it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from greenlab.warnings_banner import loud_warning

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("teacher", "model", "state_dict", "module")  # training checkpoints nest the weights
KEY_PREFIXES = ("module.", "backbone.", "encoder.")
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # a timm hub repo's weights file, in timm's order
Weights = TypeVar("Weights")


@dataclass(frozen=True)
class Pretrained:
    """The published weights ``weights=cached | hub`` stand for. ``name``: what they are (in init.source);
    ``cached()``: their local file (or folder), None when not there, never the network; ``download()``:
    fetch them and return the file (raises when it cannot)."""

    name: str
    cached: Callable[[], Path | None]
    download: Callable[[], Path]


def init_record(requested, used: str = "random", source: str | None = None, note: str | None = None) -> dict:
    """What was asked for (``requested``) and what the weights actually are (``used``: random | file |
    cached | hub; the text encoder's: random | pretrained)."""
    return {"requested": str(requested), "used": used, "source": source, "note": note}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a torch pickle read with ``weights_only=True``), taken out
    of training checkpoints' wrappers (``WRAPPER_KEYS``) and key prefixes (``KEY_PREFIXES``)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    for wrapper in WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return {strip_prefix(k): v for k, v in state.items()}


def strip_prefix(key: str) -> str:
    """A parameter name without the wrappers' prefixes (``module.``, ``backbone.``, ``encoder.``)."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def resolve_weights(
    weights: str | None, pretrained: Pretrained | None, what: str, hint: str,
    read: Callable[[Path], Weights] = read_state_dict,
) -> tuple[Weights | None, dict]:  # fmt: skip
    """``weights`` (``cached`` | ``hub`` | ``random`` / None | a path) -> (``read(file)``: by default the
    file's state dict; None for random init) and the init record, whose ``source`` names the file.

    ``pretrained``: the weights ``cached`` / ``hub`` stand for (None: none are published). When those cannot
    be had: a loud warning naming ``what`` (the backbone) and ``hint`` (what else to give), and None.
    """
    if weights in ("random", None):
        return None, init_record(weights)
    if weights not in ("cached", "hub"):
        path = Path(weights).expanduser()
        return read(path), init_record(weights, "file", str(path.resolve()))
    file, used, note = None, "cached", f"no published weights for {what}"
    if pretrained is not None:
        file = pretrained.cached()
        note = f"{pretrained.name} is not in the local cache and weights=cached never downloads"
        if file is None and weights == "hub":
            used = "hub"
            try:
                file = pretrained.download()
            except Exception as err:  # no network, no such weights, ...
                note = f"download of {pretrained.name} failed: {type(err).__name__}: {err}"
    if file is not None:
        return read(file), init_record(weights, used, f"{pretrained.name} ({file})")
    loud_warning(
        f"{what}: pretrained weights could not be had ({note}).\n"
        "It starts from RANDOM initialisation; results will not match the paper.\n"
        f"{hint}\nresults.json records init=random."
    )
    return None, init_record(weights, note=note)


def timm_hub_weights(pretrained_cfg: dict) -> Pretrained | None:
    """A timm model's hub weights (``pretrained_cfg["hf_hub_id"]``, e.g. ``timm/rexnet_300.nav_in1k``) in
    the local Hugging Face cache or on the hub; None for a model without hub weights."""
    hub_id = pretrained_cfg.get("hf_hub_id")
    if not hub_id:
        return None
    names = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else HF_WEIGHTS
    return Pretrained(
        hub_id, lambda: _cached_hf_file(hub_id, names), lambda: _download_hf_file(hub_id, names)
    )


def _cached_hf_file(hub_id: str, names: tuple[str, ...]) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    for name in names:
        found = try_to_load_from_cache(hub_id, name)
        if isinstance(found, str):
            return Path(found)
    return None


def _download_hf_file(hub_id: str, names: tuple[str, ...]) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in names:
        try:
            return Path(hf_hub_download(hub_id, name))
        except EntryNotFoundError as err:  # not this format: the next one
            missing = err
    raise missing


def torch_hub_weights(name: str, url: str) -> Pretrained:
    """Weights published at ``url`` (torchvision's), in torch hub's cache (``<hub dir>/checkpoints``)."""
    file = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name

    def download() -> Path:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(file), progress=False)
        return file

    return Pretrained(name, lambda: file if file.is_file() else None, download)


def misfit(
    module: nn.Module, state: dict[str, torch.Tensor], where: str, in_file: dict | None = None
) -> str | None:
    """Why ``state`` does not load exactly into ``module`` (None when it does): the weights file ``where``,
    the first keys of another shape (shapes as in ``in_file``, the file before conversion, where it has the
    key), the missing and the unexpected keys."""
    own, in_file = module.state_dict(), in_file or {}
    shapes = [f"{k} {tuple(in_file.get(k, v).shape)} in the file vs {tuple(own[k].shape)} in the model"
              for k, v in state.items() if k in own and v.shape != own[k].shape]  # fmt: skip
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    found = [f"{label} {', '.join(keys[:4])}{f' (+{len(keys) - 4} more)' if len(keys) > 4 else ''}"
             for label, keys in (("shape mismatch", shapes), ("missing", missing), ("unexpected", unexpected))
             if keys]  # fmt: skip
    return f"weights file {where} does not fit {type(module).__name__}: {'; '.join(found)}" if found else None


def load_exactly(
    module: nn.Module, state: dict[str, torch.Tensor], where: str, in_file: dict | None = None
) -> None:
    """Load ``state`` into ``module``; every key and shape must match, else a ValueError (``misfit``)."""
    problem = misfit(module, state, where, in_file)
    if problem:
        raise ValueError(problem)
    module.load_state_dict(state)
    log.info("loaded %s weights from %s", type(module).__name__, where)


def save_weights(module: nn.Module, path: Path) -> Path:
    """``module``'s state dict to ``path``; never overwrites an existing file."""
    return save_state(module.state_dict(), path)


def save_state(state: dict, path: Path) -> Path:
    """A state dict (or a dict of them) to ``path``; never overwrites an existing file."""
    if path.exists():
        raise FileExistsError(f"{path} already exists; refusing to overwrite trained weights")
    torch.save(state, path)
    return path


def export(module: nn.Module, output_dir: Path, name: str = "backbone") -> dict:
    """``<name>.pth`` (the state dict) and ``<name>.json`` (``module.recipe`` with ``weights`` = that file,
    so ``factory(**arguments)`` rebuilds the trained module) in ``output_dir``; never overwrites either."""
    import json

    weights, recipe_path = output_dir / f"{name}.pth", output_dir / f"{name}.json"
    if recipe_path.exists():
        raise FileExistsError(f"{recipe_path} already exists; refusing to overwrite it")
    save_weights(module, weights)
    recipe = {**module.recipe, "weights": str(weights.resolve())}
    recipe_path.write_text(json.dumps(recipe, indent=2))
    return recipe


def export_timm_folder(module: nn.Module, folder: Path, preprocessing: dict | None) -> Path | None:
    """A timm model as a Hugging Face style folder (``config.json``: architecture, num_features,
    pretrained_cfg with mean / std / input size / crop, and ``greenlab_preprocessing``: the data's field-of-view
    crop and resize; ``model.safetensors``),
    loadable with ``timm.create_model("local-dir:" + folder, pretrained=True)``. None (nothing written) for
    a module that is not a timm model. Never overwrites."""
    if not hasattr(module, "pretrained_cfg") or not hasattr(module, "default_cfg"):
        return None
    from timm.models import save_for_hf

    if folder.exists():
        raise FileExistsError(f"{folder} already exists; refusing to overwrite it")
    preprocessing = dict(preprocessing or {})
    size = preprocessing.get("resize") or list(module.pretrained_cfg["input_size"][1:])
    data_config = {"input_size": (3, *size), "interpolation": preprocessing.get("interpolation", "bicubic"),
                   "crop_pct": preprocessing.get("crop_pct", 1.0), "crop_mode": "center",
                   "mean": tuple(preprocessing.get("mean", module.pretrained_cfg["mean"])),
                   "std": tuple(preprocessing.get("std", module.pretrained_cfg["std"]))}  # fmt: skip
    config = {
        "greenlab_preprocessing": preprocessing
    }  # beside pretrained_cfg (timm refuses unknown keys in it)
    save_for_hf(module, str(folder), model_config=config, data_config=data_config, safe_serialization=True)
    return folder
