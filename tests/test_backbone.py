import pytest
import torch

from greenlab.backbones.vit import convert_dinov2_state_dict
from greenlab.config import build
from tests.conftest import TINY_VIT


def vit(**arguments):
    return build("backbone/vit_small_reg4_dinov2", **arguments)


def to_dinov2_format(model) -> dict:
    """Invert the conversion: the layout of Meta's official dinov2_vits14_reg4_pretrain.pth."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cls_pos = torch.randn(1, 1, state["pos_embed"].shape[-1])
    state["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    state["cls_token"] = state["cls_token"] - cls_pos
    state["register_tokens"] = state.pop("reg_token")
    state["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return state


def test_dinov2_checkpoint_keys_are_converted(tmp_path):
    torch.manual_seed(0)
    reference = vit(img_size=56, weights="random", model_kwargs=TINY_VIT).eval()
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(to_dinov2_format(reference), path)
    torch.manual_seed(1)
    loaded = vit(img_size=56, weights=str(path), model_kwargs=TINY_VIT).eval()
    assert loaded.init_record["used"] == "file" and loaded.init_record["source"] == str(path.resolve())
    images = torch.randn(2, 3, 56, 56)
    # exact up to fp32 round-off of (cls - pos) + pos
    torch.testing.assert_close(
        loaded.forward_features(images), reference.forward_features(images), atol=2e-4, rtol=1e-4
    )


def test_dinov2_position_embedding_is_resampled_to_392px_grid(tmp_path):
    reference = vit(img_size=518, weights="random", model_kwargs=TINY_VIT)  # DINOv2's 37x37 grid
    path = tmp_path / "dinov2.pth"
    torch.save({"model": to_dinov2_format(reference)}, path)  # nested like a training checkpoint
    loaded = vit(img_size=392, weights=str(path), model_kwargs=TINY_VIT)
    assert loaded.pos_embed.shape == (1, 28 * 28, 48)
    converted = convert_dinov2_state_dict(to_dinov2_format(reference))
    torch.testing.assert_close(loaded.reg_token, converted["reg_token"])


def test_missing_weights_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vit(img_size=28, weights=str(missing), model_kwargs=TINY_VIT)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        vit(img_size=28, weights=str(path), model_kwargs=TINY_VIT)


def test_offline_cached_weights_fall_back_to_random_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = vit(img_size=28, weights="cached", model_kwargs=TINY_VIT)
    assert model.init_record["used"] == "random"
    assert "RANDOM initialisation" in capsys.readouterr().err
