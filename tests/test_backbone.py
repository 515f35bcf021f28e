import pytest
import timm
import torch
from timm.models.vision_transformer import checkpoint_filter_fn

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
    torch.testing.assert_close(loaded.reg_token, reference.reg_token)


def test_official_dinov2_file_loads_as_timms_checkpoint_filter_converts_it(tmp_path):
    """Greenlab's reading (wrappers, prefixes, left-out keys) + timm's conversion and resampling gives the
    tensors timm's own ``checkpoint_filter_fn`` gives on the same file (official layout, 56 px -> 28 px)."""
    official = to_dinov2_format(vit(img_size=56, weights="random", model_kwargs=TINY_VIT))
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    loaded = vit(img_size=28, weights=str(path), model_kwargs=TINY_VIT)
    model = vit(img_size=28, weights="random", model_kwargs=TINY_VIT)
    by_timm = checkpoint_filter_fn(torch.load(path, weights_only=True), model)
    assert sorted(by_timm) == sorted(loaded.state_dict()) and "reg_token" in by_timm
    for key, value in by_timm.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert loaded.init_record["note"] == "keys left out (pre-training only, classifier): mask_token"


def test_missing_weights_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        vit(img_size=28, weights=str(missing), model_kwargs=TINY_VIT)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="does not fit"):
        vit(img_size=28, weights=str(path), model_kwargs=TINY_VIT)


FILES = {  # timm model, its arguments, the file's layout; what the error says (shapes as in the file)
    "mae_vit_l16": ("vit_large_patch16_224", {"embed_dim": 64}, "mae", [
        "pos_embed (1, 197, 64) in the file vs (1, 4, 48)", "cls_token (1, 1, 64) in the file vs (1, 1, 48)",
        "patch_embed.proj.weight (64, 3, 16, 16) in the file vs (48, 3, 14, 14)", "missing reg_token"]),
    "dinov2_reg4_wider": ("vit_small_patch14_reg4_dinov2", {"embed_dim": 64, "img_size": 56}, "dinov2", [
        "pos_embed (1, 17, 64) in the file vs (1, 4, 48)", "reg_token (1, 4, 64) in the file vs (1, 4, 48)"]),
    "dinov2_without_registers": ("vit_small_patch14_dinov2", {"img_size": 56}, "timm", [
        "pos_embed (1, 17, 48) in the file vs (1, 4, 48)", "missing reg_token"]),
}  # fmt: skip


@pytest.mark.parametrize("name", FILES)
def test_a_file_that_does_not_fit_names_itself_and_the_keys_and_shapes_that_differ(tmp_path, name):
    """Given to the tiny ViT-S/14 reg4 backbone at 28 px (pos_embed (1, 4, 48), no [CLS] row): a wider MAE
    ViT-L/16 (another patch size), a wider official DINOv2 file (converted, then compared), and one without
    registers (17 rows = [CLS] + 4 x 4, which timm's resampling cannot read as the register model's grid)."""
    model_name, changes, layout, expected = FILES[name]
    model = timm.create_model(model_name, num_classes=0, **{**TINY_VIT, **changes})
    state = to_dinov2_format(model) if layout == "dinov2" else model.state_dict()
    if layout == "mae":
        state["mask_token"] = torch.zeros(1, 1, 64)
    path = tmp_path / f"{name}.pth"
    torch.save({"model": state}, path)
    with pytest.raises(ValueError) as error:
        vit(img_size=28, weights=str(path), model_kwargs=TINY_VIT)
    message = str(error.value)
    assert message.startswith(
        f"weights file {path.resolve()} does not fit VisionTransformer: shape mismatch "
    )
    for part in expected:
        assert part in message, (part, message)


def test_offline_cached_weights_fall_back_to_random_loudly(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path))
    model = vit(img_size=28, weights="cached", model_kwargs=TINY_VIT)
    assert model.init_record["used"] == "random"
    assert "RANDOM initialisation" in capsys.readouterr().err
