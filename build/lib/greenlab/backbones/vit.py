"""Vision Transformers from timm (DINOv2 ViT-S/14 + 4 registers by default), with offline-safe weights.

``weights`` says where the initial weights come from:

- ``cached``: timm's hub weights if they are already in the local Hugging Face cache (no network), else
  random init with a loud warning. The default: nothing is ever downloaded.
- ``hub``: timm's hub weights, downloaded when online; random init with a loud warning when that fails.
- ``random``: random init (seeded by the run's seed).
- a path: a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file in timm format or in the official
  DINOv2 checkpoint format (keys converted). A missing or unreadable file is an error, never a fallback.

The initialisation actually used is recorded on ``model.init_record`` (results.json), the arguments that
rebuild the model on ``model.recipe`` (greenlab/backbones/weights.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import timm
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from greenlab.backbones.weights import init_record, load_exactly, read_state_dict, strip_prefix
from greenlab.warnings_banner import loud_warning

log = logging.getLogger(__name__)


PRETRAINING_ONLY = ("decoder", "mask_token", "dino_head", "ibot_head", "head.")  # key prefixes no encoder has


def create_vit(
    model_name: str, img_size: int, weights: str, mean: list, std: list, model_kwargs: dict | None
) -> nn.Module:
    """A timm model without classifier head (``num_classes=0``): a ViT at ``img_size`` px, or any other
    timm model by name (CNNs take any input size). ``mean`` / ``std``: the normalisation its weights expect
    (``pretrained_cfg``; ``python -m greenlab.evaluate`` gives them to the data).

    Returns the model with ``init_record`` and ``recipe`` (see greenlab/backbones/weights.py).
    """
    kwargs = dict(model_kwargs or {})
    try:
        model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
    except TypeError as err:  # a model without an input size (CNNs)
        if "img_size" not in str(err):
            raise
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(mean), "std": tuple(std),
                            "input_size": (3, img_size, img_size)}  # fmt: skip
    init = init_record(weights)

    if weights in ("cached", "hub"):
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        file = _cached_hub_file(hub_id) if hub_id else None
        if file is not None:
            load_weights_file(model, file)
            init.update(used="hub_cache", source=f"{hub_id} ({file})")
        elif weights == "hub" and hub_id:
            try:
                hub_model = timm.create_model(
                    model_name, pretrained=True, img_size=img_size, num_classes=0, **kwargs
                )
                model.load_state_dict(hub_model.state_dict())
                init.update(used="hub", source=hub_id)
            except Exception as err:  # no network, no such weights, ...
                init["note"] = f"download of {hub_id} failed: {type(err).__name__}: {err}"
        else:
            init["note"] = (
                f"{hub_id or model_name} weights are not in the local cache and weights=cached never downloads"
            )
    elif weights != "random":
        path = Path(weights).expanduser()
        dropped = load_weights_file(model, path)
        init.update(used="file", source=str(path.resolve()))
        if dropped:
            init["note"] = f"pre-training-only keys left out: {_summary(dropped)}"
            log.info("%s: %s", path, init["note"])

    if init["used"] == "random" and weights != "random":
        loud_warning(
            f"{model_name}: pretrained weights could not be had ({init['note']}).\n"
            "The backbone starts from RANDOM initialisation; results will not match the paper.\n"
            "Give a local file with backbone.weights=/path/to/dinov2_vits14_reg4_pretrain.pth (official DINOv2)\n"
            "or a timm .safetensors, or backbone.weights=hub when online. results.json records init=random."
        )
    model.init_record = init
    model.recipe = {"factory": f"{__name__}.create_vit", "model_name": model_name, "img_size": img_size,
                    "mean": list(mean), "std": list(std), "model_kwargs": kwargs}  # fmt: skip
    return model


def _summary(keys: list[str]) -> str:
    """``decoder_blocks.* (96 keys), mask_token``: dropped keys grouped by their first name part."""
    groups: dict[str, int] = {}
    for key in keys:
        head = key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n} keys)" if n > 1 else h for h, n in groups.items())


def _cached_hub_file(hub_id: str) -> Path | None:
    """Path of a hub repo's weights in the local Hugging Face cache, or None; never touches the network."""
    from huggingface_hub import try_to_load_from_cache

    for filename in ("model.safetensors", "pytorch_model.bin"):
        found = try_to_load_from_cache(hub_id, filename)
        if isinstance(found, str):
            return Path(found)
    return None


def convert_dinov2_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Official DINOv2 checkpoint keys -> timm ``VisionTransformer`` keys.

    DINOv2 adds its position embedding to [CLS] + patches (1 + H*W rows) and keeps registers apart
    (``register_tokens``); timm's ``*_reg4_dinov2`` models embed no prefix token (``no_embed_class``), so
    the [CLS] row of the position embedding is folded into ``cls_token``. ``mask_token`` is iBOT's and unused.
    """
    state = {strip_prefix(k): v for k, v in state.items()}
    if any(".mlp.w12." in k for k in state):
        raise ValueError("SwiGLU DINOv2 checkpoints (ViT-g) are not supported; use ViT-S/B/L checkpoints")
    state.pop("mask_token", None)
    if "register_tokens" in state:
        pos_embed = state.pop("pos_embed")
        state["reg_token"] = state.pop("register_tokens")
        state["cls_token"] = state["cls_token"] + pos_embed[:, :1]
        state["pos_embed"] = pos_embed[:, 1:]
    return state


def is_dinov2_format(state: dict[str, torch.Tensor]) -> bool:
    keys = {strip_prefix(k) for k in state}
    return "mask_token" in keys or "register_tokens" in keys


def load_weights_file(model: nn.Module, path: Path) -> list[str]:
    """Load a timm-, MAE- (RETFound-MEH) or DINOv2-format (RETFound-DINOv2: its teacher) file into
    ``model``; position embeddings resampled to its grid. Returns the keys left out: a pre-training decoder,
    mask token, DINO / iBOT heads, a classifier head (``PRETRAINING_ONLY``)."""
    state = {strip_prefix(k): v for k, v in read_state_dict(Path(path)).items()}
    dinov2 = is_dinov2_format(state)
    dropped = sorted(k for k in state if k.startswith(PRETRAINING_ONLY))
    state = {k: v for k, v in state.items() if k not in dropped}
    if dinov2:
        state = convert_dinov2_state_dict(state)
    if "pos_embed" in state and state["pos_embed"].shape != model.pos_embed.shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        state["pos_embed"] = resample_abs_pos_embed(
            state["pos_embed"], new_size=model.patch_embed.grid_size, num_prefix_tokens=prefix
        )
    load_exactly(model, state, path)
    return dropped
