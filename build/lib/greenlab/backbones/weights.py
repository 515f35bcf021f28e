"""Reading weights files into backbones, and the record of the initialisation actually used.

Every backbone carries ``init_record`` = {"requested", "used", "source", "note"} (results.json prints it) and
``recipe`` = {"factory": "module.callable", **arguments}: calling the factory with those arguments (and
``weights`` = a file of trained weights) rebuilds it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("teacher", "model", "state_dict", "module")  # training checkpoints nest the weights
KEY_PREFIXES = ("module.", "backbone.", "encoder.")


def init_record(requested, used: str = "random", source: str | None = None, note: str | None = None) -> dict:
    """What was asked for (``requested``) and what the weights actually are (``used``: random | file | ...)."""
    return {"requested": str(requested), "used": used, "source": source, "note": note}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file (safetensors, or a torch pickle read with ``weights_only=True``)."""
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
    return state


def strip_prefix(key: str) -> str:
    """A parameter name without the wrappers' prefixes (``module.``, ``backbone.``, ``encoder.``)."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def load_exactly(module: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    """Load ``state`` into ``module``; every key on both sides must match (the error names the file)."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not fit {type(module).__name__}: missing keys {missing[:8]}, "
            f"unexpected keys {unexpected[:8]}"
        )
    log.info("loaded %s weights from %s", type(module).__name__, path)


def load_weights(module: nn.Module, weights: str | None, drop_head: bool = False) -> dict:
    """Load ``weights`` (a state-dict file; ``random`` / None: keep the random init) into ``module``, key
    prefixes stripped (and ``head.*`` dropped when ``drop_head``); returns the init record."""
    if weights in ("random", None):
        return init_record(weights)
    path = Path(weights).expanduser()
    state = {strip_prefix(k): v for k, v in read_state_dict(path).items()}
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    load_exactly(module, state, path)
    return init_record(weights, "file", str(path.resolve()))


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
