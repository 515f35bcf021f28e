"""Any timm model by name, with offline-safe weights: Vision Transformers (DINOv2 ViT-S/14 + 4 registers
by default, MAE's ViT-L/16) and CNNs (ResNet, ConvNeXt, ...; their ``feature_info`` gives the feature
hierarchy SparK reads, greenlab/backbones/hierarchy.py).

``weights`` says where the initial weights come from:

- ``cached``: timm's hub weights if they are already in the local Hugging Face cache (no network), else
  random init with a loud warning. The default: nothing is ever downloaded.
- ``hub``: timm's hub weights, downloaded when online; random init with a loud warning when that fails.
- ``random``: random init (seeded by the run's seed).
- a path: a local ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` file in timm format, MAE's or the official
  DINOv2 checkpoint format (converted by timm). A missing or unreadable file is an error, never a fallback.

Resolved by ``greenlab.backbones.weights.resolve_weights``; loaded by ``load_timm_state``.

The initialisation actually used is recorded on ``model.init_record`` (results.json), the arguments that
rebuild the model on ``model.recipe`` (greenlab/backbones/weights.py).
"""

from __future__ import annotations

import logging

import timm
import torch
from omegaconf import OmegaConf
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from greenlab.backbones.hierarchy import tap_feature_info
from greenlab.backbones.weights import load_exactly, misfit, resolve_weights, timm_hub_weights

log = logging.getLogger(__name__)


PRETRAINING_ONLY = ("decoder", "dino_head", "ibot_head")  # key prefixes no encoder has
HINT = ("Give a local file with backbone.weights=/path/to/dinov2_vits14_reg4_pretrain.pth (official DINOv2)\n"
        "or a timm .safetensors, or backbone.weights=hub when online.")  # fmt: skip


def create_timm_model(
    model_name: str,
    img_size: int,
    weights: str,
    mean: list,
    std: list,
    model_kwargs: dict | None,
    feature_strides: list[int] | None,
) -> nn.Module:
    """A timm model without classifier head (``num_classes=0``): a ViT at ``img_size`` px, or any other
    timm model by name (CNNs take any input size). ``mean`` / ``std``: the normalisation its weights expect
    (``pretrained_cfg``; ``python -m greenlab.evaluate`` gives them to the data). ``feature_strides``: the
    strides of a CNN's hierarchy to keep (None: every stride of its ``feature_info``; SparK's ResNets use
    4, 8, 16, 32).

    Returns the model with ``init_record`` and ``recipe`` (see greenlab/backbones/weights.py).
    """
    kwargs = OmegaConf.to_container(OmegaConf.create(dict(model_kwargs or {})))  # plain lists: timm, JSON
    feature_strides = None if feature_strides is None else list(feature_strides)
    try:
        model = timm.create_model(model_name, pretrained=False, img_size=img_size, num_classes=0, **kwargs)
    except TypeError as err:  # a model without an input size (CNNs)
        if "img_size" not in str(err):
            raise
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
    model.pretrained_cfg = {**model.pretrained_cfg, "mean": tuple(mean), "std": tuple(std),
                            "input_size": (3, img_size, img_size)}  # fmt: skip
    state, init = resolve_weights(weights, timm_hub_weights(model.pretrained_cfg), model_name, HINT)
    if state is not None:
        dropped = load_timm_state(model, state, init["source"])
        if dropped:
            init["note"] = f"keys left out (pre-training only, classifier): {_summary(dropped)}"
            log.info("%s: %s", init["source"], init["note"])
    model.init_record = init
    if not isinstance(model, VisionTransformer):
        tap_feature_info(model, feature_strides)
    model.recipe = {"factory": f"{__name__}.create_timm_model", "model_name": model_name, "img_size": img_size,
                    "mean": list(mean), "std": list(std), "model_kwargs": kwargs,
                    "feature_strides": feature_strides}  # fmt: skip
    return model


def _summary(keys: list[str]) -> str:
    """``decoder_blocks.* (96 keys), mask_token``: dropped keys grouped by their first name part."""
    groups: dict[str, int] = {}
    for key in keys:
        head = key.split(".")[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n} keys)" if n > 1 else h for h, n in groups.items())


def load_timm_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> list[str]:
    """Load a timm-, MAE- (RETFound-MEH) or DINOv2-format (RETFound-DINOv2: its teacher) state dict (as
    ``read_state_dict`` gives it) from the file ``where`` into ``model``. Returns the keys left out: a
    pre-training decoder, DINO / iBOT heads (``PRETRAINING_ONLY``), MAE's / DINOv2's ``mask_token``, the
    classifier (``pretrained_cfg["classifier"]``: the model has none).

    For a ``VisionTransformer``, timm's ``checkpoint_filter_fn`` converts the official DINOv2 layout (the
    [CLS] row of the position embedding folded into ``cls_token``, ``register_tokens`` -> ``reg_token``,
    SwiGLU ``w12`` / ``w3`` -> ``fc1`` / ``fc2``; ``mask_token`` marks the layout) and resamples the
    position embedding (bicubic) to the model's grid; a patch embedding of another shape (timm would
    resample its kernel) is another model. A file that does not fit is a ValueError naming it and the first
    keys that differ, shapes as in the file.
    """
    classifier = model.pretrained_cfg.get("classifier") or ()
    classifiers = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    left_out = PRETRAINING_ONLY + tuple(f"{name}." for name in classifiers)
    dropped = sorted(k for k in state if k.startswith(left_out) or k == "mask_token")
    kept = {k: v for k, v in state.items() if k not in dropped}
    converted = kept
    if isinstance(model, VisionTransformer):
        patches = kept.get("patch_embed.proj.weight")
        if patches is not None and patches.shape[-2:] != model.patch_embed.proj.weight.shape[-2:]:
            raise ValueError(misfit(model, kept, where))  # another patch size
        try:  # mask_token, when there, tells timm the layout is DINOv2's
            converted = checkpoint_filter_fn(
                {k: v for k, v in state.items() if not k.startswith(left_out)}, model
            )
        except RuntimeError as err:  # timm's resampling of a position embedding of another grid
            raise ValueError(f"{misfit(model, kept, where)} (timm: {err})") from err
    load_exactly(model, converted, where, in_file=kept)
    return dropped
